"""The adversarial engine and SynthesisGANTrainer: learning on a fixed batch, phases and their events,
mixed precision, the learning-rate schedule, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.handlers import CheckpointSaver
from torch.utils.data import DataLoader, DistributedSampler

from medsynth.engines import (
    AdversarialTrainer,
    BatchCall,
    CheckpointPruner,
    ResumeCheckpointLoader,
    SynthesisEvaluator,
    SynthesisGANTrainer,
    SynthesisQualityMetric,
    checkpoints_by_epoch,
    linear_decay_schedule,
)
from medsynth.losses import (
    ConfidenceMapLoss,
    FeatureMatchingLoss,
    LeastSquaresAdversarialLoss,
    ShapeConsistencyLoss,
)
from medsynth.networks import (
    CGSAMRGenerator,
    LabelWiseMultiScaleDiscriminator,
    SAMRGenerator,
    make_lesion_unet,
)

SIZE, N = 32, 3


def _items(count: int, seed: int = 0) -> list[dict]:
    """Slices whose images are a fixed function of the label map and the atlas, so they can be learnt."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    items = []
    for index in range(count):
        label = np.zeros((SIZE, SIZE), dtype=np.int64)
        brain = (yy - 16) ** 2 / 13**2 + (xx - 16) ** 2 / 11**2 <= 1
        label[brain] = 1
        cy, cx = rng.integers(10, 22, size=2)
        lesion = (yy - cy) ** 2 + (xx - cx) ** 2
        label[(lesion <= 25) & brain] = 2
        label[(lesion <= 9) & brain] = 4
        label[(lesion <= 2) & brain] = 3
        atlas = np.stack([np.where(brain, 0.2 * k + 0.1 * np.sin(yy / 4.0), -1.0) for k in range(3 * N)])
        contrast = np.array([[-1, -0.2, 0.3, 0.8, 0.1], [-1, 0.1, 0.6, -0.3, 0.9], [-1, 0.3, 0.9, 0.5, -0.5]])
        image = np.stack([contrast[s][label] + 0.1 * atlas[3 * s + 1] for s in range(N)])
        items.append(
            {
                "mask": torch.as_tensor(np.moveaxis(np.eye(5, dtype=np.float32)[label], -1, 0)),
                "atlas": torch.as_tensor(atlas, dtype=torch.float32),
                "image": torch.as_tensor(np.clip(image, -1, 1), dtype=torch.float32),
                "label": torch.as_tensor(label[None]),
                "patient_id": f"p{index}",
                "slice_index": index,
            }
        )
    return items


def _parts(generator_class=CGSAMRGenerator, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    generator = generator_class(num_sequences=N, base_width=4, num_res_blocks=1)
    discriminator = LabelWiseMultiScaleDiscriminator(5 + 4 * N, base_filters=8, num_layers=2)
    segmenter = make_lesion_unet(N, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)

    def adam(module):
        return torch.optim.Adam(module.parameters(), lr=2e-3, betas=(0.5, 0.999))

    return {
        "generator": generator,
        "discriminator": discriminator,
        "segmenter": segmenter,
        "g_optimizer": adam(generator),
        "d_optimizer": adam(discriminator),
        "u_optimizer": adam(segmenter),
        "adversarial_loss": LeastSquaresAdversarialLoss(),
        "feature_matching_loss": FeatureMatchingLoss(),
        "shape_consistency_loss": ShapeConsistencyLoss(),
        "confidence_loss": ConfidenceMapLoss() if generator_class is CGSAMRGenerator else None,
    }


def _record_outputs(trainer: SynthesisGANTrainer) -> list[dict]:
    history: list[dict] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: history.append(dict(engine.state.output))
    )
    return history


@pytest.mark.parametrize("generator_class", [CGSAMRGenerator, SAMRGenerator])
def test_losses_fall_on_a_fixed_batch(generator_class):
    batch = {
        key: torch.stack([item[key] for item in _items(4)]) for key in ("mask", "atlas", "image", "label")
    }
    iterations = 40
    parts = _parts(generator_class)
    trainer = SynthesisGANTrainer("cpu", max_epochs=1, train_data_loader=[batch] * iterations, **parts)
    history = _record_outputs(trainer)
    trainer.run()

    assert len(history) == iterations
    assert all(np.isfinite(list(step.values())).all() for step in history)

    def mean(key, part):
        return float(np.mean([step[key] for step in part]))

    first, last = history[:8], history[-8:]
    # The U-Net learns the lesion labels, the generator the consistency term it is pushed by.
    assert mean("loss_u", last) < 0.8 * mean("loss_u", first)
    assert mean("loss_sc", last) < 0.8 * mean("loss_sc", first)
    assert mean("loss_g", last) < mean("loss_g", first)
    if generator_class is CGSAMRGenerator:
        assert {"loss_cm", "mean_confidence", "lambda_cm"} <= set(history[0])
        assert mean("loss_cm", last) < mean("loss_cm", first)
    else:
        assert "loss_cm" not in history[0]


def test_generator_improves_ssim_on_its_training_slices():
    items = _items(4)
    loader = DataLoader(items, batch_size=4)
    parts = _parts(CGSAMRGenerator)
    metric = SynthesisQualityMetric(sequences=["t1w", "t2w", "flair"])
    evaluator = SynthesisEvaluator("cpu", loader, parts["generator"], key_val_metric={"mean_ssim": metric})
    evaluator.run()
    before = evaluator.state.metrics["mean_ssim"]
    trainer = SynthesisGANTrainer("cpu", max_epochs=40, train_data_loader=loader, **parts)
    trainer.run()
    evaluator.run()
    after = evaluator.state.metrics["mean_ssim"]
    assert after > before + 0.15, (before, after)
    table = evaluator.state.metric_details["mean_ssim"]
    assert list(table.columns) == ["Edema", "Cavity", "Tumor", "SSIM", "PSNR"]


def _lr_sequence(scheduler_factory, epochs: int) -> list[float]:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = scheduler_factory(optimizer)
    rates = []
    for _ in range(epochs + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_linear_decay_schedule():
    rates = _lr_sequence(lambda opt: linear_decay_schedule(opt, num_epochs=10, decay_start_epoch=6), 10)
    assert rates[:7] == [1.0] * 7  # exactly constant for the first 6 completed epochs
    assert rates[8] == pytest.approx(0.5) and rates[10] == pytest.approx(0.0, abs=1e-12)
    assert _lr_sequence(lambda opt: linear_decay_schedule(opt, 4), 3) == pytest.approx([1.0, 1.0, 1.0, 0.5])
    assert _lr_sequence(lambda opt: linear_decay_schedule(opt, 4, 0), 2) == pytest.approx([1.0, 0.75, 0.5])
    assert _lr_sequence(lambda opt: linear_decay_schedule(opt, 3, 3), 3) == [1.0] * 4
    with pytest.raises(ValueError, match="decay_start_epoch"):
        linear_decay_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 4, 5)


def test_phases_fire_their_events_in_order_and_calls_choose_the_inputs():
    batch = {
        key: torch.stack([item[key] for item in _items(2)]) for key in ("mask", "atlas", "image", "label")
    }
    parts = _parts(SAMRGenerator)
    seen_by_segmenter = []

    def segmenter_call(network, batch, **replacements):
        seen_by_segmenter.append("fake" if "image" in replacements else "real")
        return BatchCall(("image",))(network, batch, **replacements)

    trainer = SynthesisGANTrainer(
        "cpu", max_epochs=1, train_data_loader=[batch] * 2, segmenter_call=segmenter_call, **parts
    )
    events = []
    for phase in SynthesisGANTrainer.phases:
        trainer.add_event_handler(
            trainer.phase_event(phase), lambda engine: events.append(engine.state.phase)
        )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: events.append("iteration"))
    trainer.run()
    assert events == ["generator", "discriminator", "segmenter", "iteration"] * 2
    # Generator step: fake (with gradients) then real (no gradients); U-Net step: real then detached fake.
    assert seen_by_segmenter == ["fake", "real", "real", "fake"] * 2
    with pytest.raises(KeyError, match="not inputs"):
        BatchCall(("mask", "atlas"))(parts["generator"], batch, image=batch["image"])


def test_bf16_mixed_precision_runs_through_the_workflow_amp_on_cpu():
    batch = {
        key: torch.stack([item[key] for item in _items(2)]) for key in ("mask", "atlas", "image", "label")
    }
    parts = _parts(CGSAMRGenerator)
    dtypes = []
    parts["generator"].register_forward_hook(
        lambda module, args, output: dtypes.append(output["images"].dtype)
    )
    trainer = SynthesisGANTrainer("cpu", max_epochs=1, train_data_loader=[batch] * 3, amp=True, **parts)
    history = _record_outputs(trainer)
    trainer.run()
    assert trainer.amp and trainer.amp_kwargs == {"dtype": torch.bfloat16} and trainer.grad_scaler is None
    assert torch.bfloat16 in dtypes  # the forward passes ran under bf16 autocast
    assert all(np.isfinite(list(step.values())).all() for step in history)
    # Weights stay float32: autocast changes the compute type, not the parameters.
    assert all(p.dtype == torch.float32 for p in parts["generator"].parameters())


def _resumable_run(tmp_path, max_epochs: int, stop_after: int | None, init_seed: int) -> dict:
    """A trainer with schedulers and checkpointing over 2 small epochs; optionally killed after an epoch."""
    parts = _parts(CGSAMRGenerator, seed=init_seed)
    dataset = _items(6)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler)
    trainer = SynthesisGANTrainer(
        "cpu",
        max_epochs=max_epochs,
        train_data_loader=loader,
        lr_schedule=lambda optimizer: linear_decay_schedule(optimizer, max_epochs, 1),
        **parts,
    )
    objects = trainer.checkpoint_objects
    assert set(objects) == {
        "trainer",
        *("generator", "discriminator", "segmenter", "confidence_loss"),
        *(
            f"{name}_{kind}"
            for name in ("generator", "discriminator", "segmenter")
            for kind in ("optimizer", "scheduler")
        ),
    }
    ResumeCheckpointLoader(str(tmp_path), objects).attach(trainer)
    CheckpointSaver(str(tmp_path), objects, save_interval=1, n_saved=2).attach(trainer)
    CheckpointPruner(str(tmp_path), keep=2).attach(trainer)
    if stop_after is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda engine: engine.terminate())
    batches = []
    trainer.add_event_handler(
        Events.ITERATION_STARTED, lambda e: batches.append(e.state.batch["slice_index"].tolist())
    )
    trainer.run()
    return {"trainer": trainer, "batches": batches, **parts}


def test_exact_resume(tmp_path):
    straight = _resumable_run(tmp_path / "straight", max_epochs=2, stop_after=None, init_seed=0)
    first = _resumable_run(tmp_path / "resumed", max_epochs=2, stop_after=1, init_seed=0)
    assert first["trainer"].state.epoch == 1
    assert [p.name for p in checkpoints_by_epoch(tmp_path / "resumed")] == ["checkpoint_epoch=1.pt"]
    # A checkpoint cut short by a kill is skipped in favour of the previous one.
    (tmp_path / "resumed" / "checkpoint_epoch=7.pt").write_bytes(b"truncated")
    # Different initial weights: everything that matters must come from the checkpoint.
    second = _resumable_run(tmp_path / "resumed", max_epochs=2, stop_after=None, init_seed=1)

    assert second["trainer"].state.epoch == 2
    # The resumed run's saver knows nothing of the first run's files: the pruner keeps the 2 newest
    # and removes the unreadable later one.
    assert [p.name for p in checkpoints_by_epoch(tmp_path / "resumed")] == [
        "checkpoint_epoch=2.pt",
        "checkpoint_epoch=1.pt",
    ]
    assert first["batches"] + second["batches"] == straight["batches"]  # same data order per epoch
    for name in ("generator", "discriminator", "segmenter", "confidence_loss"):
        expected, actual = straight[name].state_dict(), second[name].state_dict()
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}.{key} differs after resume"
    assert (
        second["trainer"].schedulers["generator"].get_last_lr()
        == straight["trainer"].schedulers["generator"].get_last_lr()
    )
    assert second["trainer"].schedulers["generator"].get_last_lr() == [pytest.approx(0.0, abs=1e-12)]
    assert (
        second["g_optimizer"].state_dict()["state"][0]["step"]
        == straight["g_optimizer"].state_dict()["state"][0]["step"]
    )


def test_checkpoint_pruner_keeps_the_newest_of_the_current_run(tmp_path):
    from ignite.engine import Engine

    for epoch in (1, 2, 3, 4, 5, 9):
        (tmp_path / f"checkpoint_epoch={epoch}.pt").write_bytes(b"x")
    (tmp_path / "model_best.pt").write_bytes(b"x")  # not an interval checkpoint: never touched
    engine = Engine(lambda engine, batch: None)
    engine.state.epoch = 5
    CheckpointPruner(str(tmp_path), keep=2)(engine)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_epoch=4.pt",
        "checkpoint_epoch=5.pt",
        "model_best.pt",
    ]
    with pytest.raises(ValueError, match="at least 2"):
        CheckpointPruner(str(tmp_path), keep=1)


class _ToyCycleTrainer(AdversarialTrainer):
    """A cycle-consistent GAN in a few lines on the base engine: two generators and two discriminators,
    one optimizer per phase (the generators share one), LSGAN + cycle L1."""

    phases = ("generators", "discriminators")

    def train_step(self, batch):
        g_ab, g_ba, d_a, d_b = (self.networks[k] for k in ("g_ab", "g_ba", "d_a", "d_b"))
        real_a, real_b = batch["a"], batch["b"]
        with self.autocast():
            fake_b, fake_a = g_ab(real_a), g_ba(real_b)
            with self.no_sync("d_a", "d_b"):
                adversarial = ((d_b(fake_b) - 1) ** 2).mean() + ((d_a(fake_a) - 1) ** 2).mean()
            cycle = (g_ba(fake_b) - real_a).abs().mean() + (g_ab(fake_a) - real_b).abs().mean()
        loss_g = adversarial + 10.0 * cycle
        self.optimize("generators", loss_g)
        with self.autocast():
            loss_d = 0.5 * sum(
                ((d(real) - 1) ** 2).mean() + (d(fake.detach()) ** 2).mean()
                for d, real, fake in ((d_a, real_a, fake_a), (d_b, real_b, fake_b))
            )
        self.optimize("discriminators", loss_d)
        return {
            "loss_g": float(loss_g.detach()),
            "loss_cycle": float(cycle.detach()),
            "loss_d": float(loss_d.detach()),
        }


def test_a_cycle_consistent_gan_is_a_short_subclass_of_the_engine(tmp_path):
    torch.manual_seed(0)

    def conv():
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 3, padding=1)
        )

    networks = {name: conv() for name in ("g_ab", "g_ba", "d_a", "d_b")}
    generators = [*networks["g_ab"].parameters(), *networks["g_ba"].parameters()]
    discriminators = [*networks["d_a"].parameters(), *networks["d_b"].parameters()]
    optimizers = {
        "generators": torch.optim.Adam(generators, lr=1e-2),
        "discriminators": torch.optim.Adam(discriminators, lr=1e-2),
    }
    # Unpaired domains: B is a fixed function of other images than those of A.
    generator = torch.Generator().manual_seed(1)
    batches = [
        {"a": torch.rand(4, 1, 8, 8, generator=generator), "b": -torch.rand(4, 1, 8, 8, generator=generator)}
        for _ in range(30)
    ]
    trainer = _ToyCycleTrainer(
        "cpu",
        max_epochs=2,
        train_data_loader=batches,
        networks=networks,
        optimizers=optimizers,
        lr_schedule=lambda optimizer: linear_decay_schedule(optimizer, 2, 1),
        prepare_batch=lambda batch, device, non_blocking, **kwargs: batch,
    )
    phases = []
    for phase in trainer.phases:
        trainer.add_event_handler(
            trainer.phase_event(phase), lambda engine: phases.append(engine.state.phase)
        )
    history = _record_outputs(trainer)
    trainer.run()
    assert phases == ["generators", "discriminators"] * 60
    assert np.mean([h["loss_cycle"] for h in history[-10:]]) < 0.7 * np.mean(
        [h["loss_cycle"] for h in history[:5]]
    )
    assert set(trainer.checkpoint_objects) == {
        "trainer",
        *networks,
        "generators_optimizer",
        "discriminators_optimizer",
        "generators_scheduler",
        "discriminators_scheduler",
    }
    with pytest.raises(ValueError, match="no optimizer for phase"):
        _ToyCycleTrainer("cpu", 1, batches, networks, {"generators": optimizers["generators"]})


def test_sample_grids_show_the_largest_lesion_slice_and_random_lesion_slices(tmp_path):
    from medsynth.engines import SampleGridHandler

    items = _items(8)
    for index in (1, 4, 6):  # slices without lesion
        items[index]["label"] = (items[index]["label"] > 0).long()
    areas = [int((item["label"] >= 2).sum()) for item in items]
    parts = _parts(CGSAMRGenerator)
    handler = SampleGridHandler(
        parts["generator"], items, str(tmp_path), ["t1w", "t2w", "flair"], num_samples=3
    )
    chosen = handler.sample_indices()
    assert chosen[0] == int(np.argmax(areas)) and len(chosen) == 3 and len(set(chosen)) == 3
    assert all(areas[i] > 0 for i in chosen)
    assert handler.sample_indices() == chosen  # the same slices every epoch
    written = handler.write(1)
    assert len(written) == 3 and all(p.stat().st_size > 1000 for p in written)
    many = SampleGridHandler(parts["generator"], items, str(tmp_path), ["t1w", "t2w", "flair"], num_samples=7)
    assert len(set(many.sample_indices())) == 7  # too few lesion slices: others fill in


def test_training_time_estimate_is_logged_before_the_time_is_spent(caplog):
    import logging

    from medsynth.engines import TrainingTimeEstimate

    batch = {
        key: torch.stack([item[key] for item in _items(2)]) for key in ("mask", "atlas", "image", "label")
    }
    parts = _parts(SAMRGenerator)
    trainer = SynthesisGANTrainer("cpu", max_epochs=3, train_data_loader=[batch] * 6, **parts)
    estimate = TrainingTimeEstimate(warmup=1, measure=3)
    estimate.attach(trainer)
    with caplog.at_level(logging.INFO, logger="medsynth.engines.handlers"):
        trainer.run()
    messages = [r.getMessage() for r in caplog.records if r.name == "medsynth.engines.handlers"]
    assert any("epoch = 6 iterations, 3 epoch(s) to go" in m for m in messages)
    [line] = [m for m in messages if "at the current rate" in m]
    assert "3 epoch(s) about" in line and estimate.seconds_per_iteration > 0
