"""The medsynth MONAI Label app: the trained synthesis runs and the lesion-segmentation run as
inference tasks (``medsynth.serving.tasks``). ``medsynth serve`` starts the MONAI Label server on
it; the models come in the app config ``medsynth_models`` (a JSON list of
``{"name", "kind": "synthesis" | "segmentation", "bundle", "run_dir"}``)."""

from __future__ import annotations

import json
import logging

from monailabel.interfaces.app import MONAILabelApp

import medsynth
from medsynth.serving.tasks import LesionSegmentationTask, SynthesisTask

logger = logging.getLogger(__name__)


class MedsynthApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        self.models = json.loads(conf.get("medsynth_models", "[]"))
        self.device = conf.get("medsynth_device", "cpu")
        self.overrides = json.loads(conf.get("medsynth_overrides", "{}"))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="medsynth",
            description="Lesion-mask-based multi-sequence MRI synthesis and lesion segmentation",
            version=medsynth.__version__,
        )

    def init_infers(self) -> dict:
        tasks = {}
        for model in self.models:
            if model["kind"] == "segmentation":
                tasks[model["name"]] = LesionSegmentationTask(
                    model["run_dir"], bundle=model["bundle"], device=self.device, overrides=self.overrides
                )
            else:
                tasks[model["name"]] = SynthesisTask(
                    model["bundle"], model["run_dir"], donor_path=self._image_path, device=self.device,
                    overrides=self.overrides,
                )  # fmt: skip
        logger.info("medsynth models served: %s", ", ".join(tasks) or "none")
        return tasks

    def _image_path(self, image_id: str) -> str:
        store = self.datastore()
        return store.get_image_uri(image_id) if image_id in store.list_images() else ""
