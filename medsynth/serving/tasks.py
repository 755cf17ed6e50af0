"""MONAI Label inference tasks around the bundles' own inference (requires ``monailabel``).

* :class:`SynthesisTask`: a lesion label map (the request's ``image``, or an uploaded ``label``) ->
  every sequence of a synthesis bundle (one zip: a NIfTI per sequence, the label map used, the
  brain mask, ``synthesis.json`` and, from CG-SAMR, ``confidence_<sequence>.nii.gz``) or one
  chosen sequence as a NIfTI; the atlas is the model's own; ``params`` may ask for a manipulation
  (mirror, grow, shrink, transplant with a datastore donor, random) and a seed. MONAI Label has no
  "generation" type, so it is ``others``: for scripts.
* :class:`LesionSegmentationTask`: a multi-sequence image (a 4D NIfTI, sequences in the model's
  order along the 4th axis) -> the lesion label map of the ``lesion_seg`` bundle; a segmentation
  task with named labels, which 3D Slicer and OHIF list.

Both run the bundle's ``inference.json`` pieces, so a served result equals a bundle run's.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medsynth.constants import CLINICAL_SEQUENCES, LABEL_NAMES, MANIPULATIONS, confidence_column
from medsynth.utils.bundles import bundle_config_files

logger = logging.getLogger(__name__)

__all__ = ["InvalidRequestError", "LesionSegmentationTask", "SynthesisTask", "synthesis_settings"]

# The request parameters of a synthesis task and their defaults (listed in /info/).
SYNTHESIS_PARAMETERS: dict[str, Any] = {
    "manipulation": "none",
    "grow_percent": 100.0,
    "shrink_percent": -50.0,
    "seed": 0,
    "sequence": "all",
    "donor": "",
}


class InvalidRequestError(ValueError):
    """A request's parameters cannot be served; the server answers 400 with the message."""


def synthesis_settings(
    params: Mapping[str, Any], sequences: Sequence[str], donor_path: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """The checked synthesis settings of a request's ``params`` (defaults: :data:`SYNTHESIS_PARAMETERS`).

    Raises:
        InvalidRequestError: an unknown manipulation, a percentage or seed that is not a number, an
            unknown sequence, a transplant without a known donor.
    """
    settings = {key: params.get(key, default) for key, default in SYNTHESIS_PARAMETERS.items()}
    if settings["manipulation"] not in MANIPULATIONS:
        raise InvalidRequestError(
            f"manipulation {settings['manipulation']!r} is not one of {list(MANIPULATIONS)}"
        )
    for key in ("grow_percent", "shrink_percent"):
        try:
            settings[key] = float(settings[key])
        except (TypeError, ValueError):
            raise InvalidRequestError(f"{key} must be a number, got {settings[key]!r}") from None
    if settings["shrink_percent"] <= -100 or settings["shrink_percent"] >= 0:
        raise InvalidRequestError(f"shrink_percent must be in (-100, 0), got {settings['shrink_percent']:g}")
    if settings["grow_percent"] <= 0:
        raise InvalidRequestError(f"grow_percent must be positive, got {settings['grow_percent']:g}")
    if isinstance(settings["seed"], bool) or not isinstance(settings["seed"], int):
        raise InvalidRequestError(f"seed must be an integer, got {settings['seed']!r}")
    if settings["sequence"] != "all" and settings["sequence"] not in sequences:
        raise InvalidRequestError(
            f"sequence {settings['sequence']!r} is not 'all' or one of {list(sequences)}"
        )
    donor = str(settings["donor"] or "")
    if settings["manipulation"] == "transplant" and not donor:
        raise InvalidRequestError("manipulation 'transplant' needs a donor: the datastore id of a label map")
    if donor:
        path = donor_path(donor) if donor_path else ""
        if not path:
            raise InvalidRequestError(f"donor {donor!r} is not an image of the datastore")
        settings["donor_file"] = path
    return settings


def _answering_input_problems(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """``function(...)``, with an input problem anywhere in the error's cause chain (a bad mask, a donor
    on another grid) raised as :class:`InvalidRequestError`: the client gets 400 and the message."""
    from medsynth.utils.errors import input_problem_in

    try:
        return function(*args, **kwargs)
    except Exception as error:
        problem = input_problem_in(error)
        if problem is None:
            raise
        raise InvalidRequestError(str(problem)) from error


def _result_path(suffix: str) -> str:
    """A fresh file name for a result; MONAI Label deletes the file once it has been sent."""
    import os

    handle, path = tempfile.mkstemp(prefix="medsynth_", suffix=suffix)
    os.close(handle)
    return path


def _model_sequences(run_dir: Path) -> list[str]:
    from medsynth.data.atlas import model_atlas_sequences

    sequences = model_atlas_sequences(run_dir / "models")
    if not sequences:
        raise FileNotFoundError(f"{run_dir}: no models/atlas.json; serve a trained synthesis run")
    return sequences


class SynthesisTask(InferTask):
    """Serve one trained synthesis run (see the module docstring).

    Args:
        bundle: the synthesis bundle folder (``bundles/cg_samr``, ``bundles/samr``, ...).
        run_dir: the training run (``models/model.pt``, ``models/atlas.json``).
        donor_path: datastore id -> label-map file (for a transplant's donor).
        device: where the network runs.
        overrides: config overrides the run was trained with (``image_size``, network sizes).
    """

    def __init__(
        self,
        bundle: str | Path,
        run_dir: str | Path,
        donor_path: Callable[[str], str] | None = None,
        device: str = "cpu",
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.bundle, self.run_dir = Path(bundle), Path(run_dir)
        self.overrides = dict(overrides or {})
        self.sequences = _model_sequences(self.run_dir)
        self.donor_path = donor_path
        self.device = device
        super().__init__(
            type=InferType.OTHERS,
            labels={name: value for value, name in LABEL_NAMES.items()},
            dimension=3,
            description=f"{self.bundle.name}: synthesize {', '.join(self.sequences)} from a lesion label map",
            config=dict(SYNTHESIS_PARAMETERS),
        )

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "sequences": self.sequences,
            "input": "a label map (0 background, 1 normal brain, 2 edema, 3 cavity, 4 tumour): "
            "image or label",
            "output": "a zip of one NIfTI per sequence, label.nii.gz, brain_mask.nii.gz, synthesis.json, "
            "confidence_<sequence>.nii.gz (CG-SAMR); "
            "or one NIfTI with params.sequence",
            "parameters": {
                "manipulation": list(MANIPULATIONS),
                **{k: type(v).__name__ for k, v in SYNTHESIS_PARAMETERS.items() if k != "manipulation"},
            },
        }

    def is_valid(self) -> bool:
        return (self.run_dir / "models" / "model.pt").is_file()

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        from monai.bundle import run

        mask = str(request.get("label") or request.get("image") or "")
        if not mask:
            raise InvalidRequestError("send a label map as image or label")
        settings = synthesis_settings(request, self.sequences, self.donor_path)
        work = Path(tempfile.mkdtemp(prefix="medsynth_serve_"))
        try:
            _answering_input_problems(
                run,
                config_file=bundle_config_files(self.bundle, "inference"),
                meta_file=str(self.bundle / "configs" / "metadata.json"),
                logging_file=str(
                    Path(bundle_config_files(self.bundle, "inference")[0]).parent / "logging.conf"
                ),
                output_dir=str(self.run_dir),
                mask_file=mask,
                case_name="case",
                inference_dir=str(work / "out"),
                manipulation=settings["manipulation"],
                grow_percent=settings["grow_percent"],
                shrink_percent=settings["shrink_percent"],
                seed=settings["seed"],
                donor_file=settings.get("donor_file", ""),
                device=f"$torch.device('{self.device}')",
                with_confidence=True,  # CG-SAMR's maps come with the sequences (others have none)
                **self.overrides,
            )
            case = work / "out" / "case"
            record = json.loads((case / "synthesis.json").read_text())
            suffix = ".nii.gz" if settings["sequence"] != "all" else ".zip"
            result = _result_path(suffix)
            if settings["sequence"] != "all":
                shutil.copy(case / f"{settings['sequence']}.nii.gz", result)
            else:
                names = [f"{s}.nii.gz" for s in self.sequences]
                names += ["label.nii.gz", "brain_mask.nii.gz", "synthesis.json"]
                names += [f"{confidence_column(s)}.nii.gz" for s in self.sequences]  # CG-SAMR only
                with zipfile.ZipFile(result, "w", zipfile.ZIP_DEFLATED) as archive:
                    for name in names:
                        if (case / name).is_file():
                            archive.write(case / name, name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        params = {
            "model": self.bundle.name,
            "sequences": self.sequences if settings["sequence"] == "all" else [settings["sequence"]],
            "manipulation": record.get("manipulation_info", {"operation": "none"}),
            "intensity_windows": record.get("intensity_windows", ""),
        }
        return result, params


class LesionSegmentationTask(InferTask):
    """Serve a trained ``lesion_seg`` run: a 4D multi-sequence NIfTI -> the lesion label map.

    Args:
        run_dir: the training run of ``bundles/lesion_seg`` (``models/model.pt``).
        sequences: the model's input sequences in channel order (default: the first ones of
            :data:`~medsynth.constants.CLINICAL_SEQUENCES` for the network's input channels).
        bundle: the bundle folder.
        device: where the network runs.
        overrides: config overrides the run was trained with.
    """

    def __init__(
        self,
        run_dir: str | Path,
        sequences: Sequence[str] | None = None,
        bundle: str | Path = "bundles/lesion_seg",
        device: str = "cpu",
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_dir, self.bundle, self.device = Path(run_dir), Path(bundle), device
        self.overrides = dict(overrides or {})
        self.sequences = list(sequences) if sequences else self._sequences_from_weights()
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={name: value for value, name in LABEL_NAMES.items() if value > 0},
            dimension=3,
            description=f"lesion segmentation from {', '.join(self.sequences)} (a 4D NIfTI in this order)",
        )

    def _sequences_from_weights(self) -> list[str]:
        from medsynth.utils.checkpoints import read_weights

        state = read_weights(self.run_dir / "models" / "model.pt", "lesion-segmentation model")
        first = next(v for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 4)
        return list(CLINICAL_SEQUENCES[: int(first.shape[1])])

    def info(self) -> dict[str, Any]:
        return {**super().info(), "sequences": self.sequences}

    def is_valid(self) -> bool:
        return (self.run_dir / "models" / "model.pt").is_file()

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        import nibabel as nib
        import numpy as np
        from monai.bundle import ConfigParser

        from medsynth.utils.io import save_nifti

        image_path = str(request.get("image") or "")
        image = nib.load(image_path)
        if image.ndim != 4 or image.shape[3] != len(self.sequences):
            raise InvalidRequestError(
                f"send a 4D NIfTI with {len(self.sequences)} volumes ({', '.join(self.sequences)}), "
                f"got shape {image.shape}"
            )
        work = Path(tempfile.mkdtemp(prefix="medsynth_serve_"))
        try:
            data = np.asanyarray(image.dataobj)
            item = {"case": "case"}
            for index, sequence in enumerate(self.sequences):
                item[sequence] = str(
                    save_nifti(data[..., index].astype(np.float32), image.affine, work / f"{sequence}.nii.gz")
                )
            parser = ConfigParser()
            parser.read_config(bundle_config_files(self.bundle, "inference"))
            parser.update(
                {
                    "output_dir": str(self.run_dir),
                    "inference_dir": str(work / "out"),
                    "sequences": self.sequences,
                    "cases": [item],
                    "device": f"$torch.device('{self.device}')",
                    **self.overrides,
                }
            )
            _answering_input_problems(lambda: parser.get_parsed_content("evaluator").run())
            result = _result_path(".nii.gz")
            shutil.copy(work / "out" / "case" / "lesion_seg.nii.gz", result)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return result, {"model": "lesion_seg", "sequences": self.sequences}
