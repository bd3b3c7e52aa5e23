"""Mutation score of the decision modules' tests: plant one small bug at a time in a copy of the
repository, run the tests that cover its module, and count the bugs they catch.

    uv run python benchmarks/mutants.py            # every mutation
    uv run python benchmarks/mutants.py detect     # those whose file name contains "detect"

The checkout is never modified: the tree (without .git and .venv) is copied to a temporary folder,
each mutation is applied there and undone after its run, and the tests run with this environment's
Python on the copy (PYTHONPATH). A mutation is caught when its tests fail; the selections with -k
are the fast tests of a file (those that decode no film).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QUALITY = ["tests/test_quality.py", "-k", "not real"]
DETECT = ["tests/test_detect.py", "-k", "keep_rule"]
SHARD = ["tests/test_shard.py", "-k", "split or shuffled or does_not_stop"]
WORKDIR = ["tests/test_workdir.py"]
RUNNERS = ["tests/test_runners.py", "-k", "not ray or readme"]
TRAIN = ["tests/historynet/test_train.py::test_the_defaults_are_the_papers_hyper_parameters_with_the_recommended_losses",
         "tests/historynet/test_train.py::test_each_preset_sets_its_info_term_and_warm_up_unless_they_are_given",
         "tests/historynet/test_losses.py"]
EXTRACT = ["tests/test_extract.py", "-k", "millisecond"]
RELABEL = ["tests/test_relabel.py", "-k", "keeps_images or older_model or override"]
LABELER = ["tests/test_labeler.py", "-k", "predict_batch"]
LABEL = ["tests/test_label.py", "-k", "every_kept_frame"]
SELECTION = ["tests/test_labeler_train.py", "-k", "best_epoch_is_picked"]

# (file, the exact original text (one occurrence; a line, or two for a swap), its replacement, tests)
MUTATIONS = [
    ("mhmd_builder/quality.py", '10.0, "Hasler', '5.0, "Hasler', QUALITY),
    ("mhmd_builder/quality.py", '3.0, "Lab chroma', '1.5, "Lab chroma', QUALITY),
    ("mhmd_builder/quality.py", 'scores["blur_sigma"] > t.max_blur_sigma', 'scores["blur_sigma"] >= t.max_blur_sigma',
     QUALITY),
    ("mhmd_builder/quality.py", '_threshold(25.0, "Mean luma', '_threshold(20.0, "Mean luma', QUALITY),
    ("mhmd_builder/quality.py", '0.5, "Fraction of clipped-white', '0.6, "Fraction of clipped-white', QUALITY),
    ("mhmd_builder/quality.py", 'scores["short_side"] < t.min_short_side', 'scores["short_side"] <= t.min_short_side',
     QUALITY),
    ("mhmd_builder/quality.py", 'if _rank(v) > _rank(self.held[0]):', 'if False:', QUALITY),
    ("mhmd_builder/quality.py", 'return not v.flags, v.scores["sharpness"]', 'return not v.flags, -v.scores["sharpness"]',
     QUALITY),
    ("mhmd_builder/quality.py", '.bit_count() > self.max_distance', '.bit_count() >= self.max_distance', QUALITY),
    ("mhmd_builder/detect.py", "if det.count > s.max_persons:", "if det.count >= s.max_persons:", DETECT),
    ("mhmd_builder/detect.py", "if det.count < s.min_persons:", "if det.count <= s.min_persons:", DETECT),
    ("mhmd_builder/detect.py", "det.largest_area < s.min_person_area", "det.largest_area <= s.min_person_area", DETECT),
    ("mhmd_builder/detect.py", "max_persons: int = 5", "max_persons: int = 6", DETECT),
    ("mhmd_builder/shard.py", "counts.sum():\n            continue", "counts.sum():\n            break", SHARD),
    ("mhmd_builder/shard.py", "np.random.default_rng(seed).permutation", "np.random.default_rng(0).permutation", SHARD),
    ("mhmd_builder/shard.py", "part.iloc[np.random.default_rng(settings.seed).permutation(len(part))]",
     "part.iloc[range(len(part))]", SHARD),
    ("mhmd_builder/shard.py", "part.iloc[np.random.default_rng(settings.seed)", "part.iloc[np.random.default_rng(0)",
     SHARD),
    ("mhmd_builder/workdir.py",
     '        atomic_write_table(self.table_path(stage, partition), table)\n'
     '        atomic_write_json(self._marker(stage, partition, "done"), summary)',
     '        atomic_write_json(self._marker(stage, partition, "done"), summary)\n'
     '        atomic_write_table(self.table_path(stage, partition), table)', WORKDIR),
    ("mhmd_builder/workdir.py", '        self._marker(stage, partition, "done").unlink(missing_ok=True)\n        self._marker(',
     '        self._marker(', WORKDIR),
    ("mhmd_builder/runners.py", "retries: int = 2", "retries: int = 1", RUNNERS),
    ("mhmd_builder/runners.py", "return PartitionResult(partition.id, False, reason, {})",
     "return PartitionResult(partition.id, True, reason, {})", RUNNERS),
    ("mhmd_builder/runners.py",
     '    stage.workdir.mark_failed(stage.name, partition.id, {**partition.record, "reason": reason})\n', "", RUNNERS),
    ("mhmd_builder/runners.py", "return max(1, self.workers or stage.resources.local_workers or machine_cores())",
     "return max(1, stage.resources.local_workers or machine_cores())", RUNNERS),
    ("mhmd_builder/runners.py", "workers = min(self.worker_count(stage), len(partitions))",
     "workers = len(partitions)", RUNNERS),
    ("mhmd_builder/runners.py", "if self.worker_count(stage) == 1 or len(partitions) == 1:",
     "if len(partitions) == 1:", RUNNERS),
    ("mhmd_builder/historynet/train.py", "lr: float = 2e-5", "lr: float = 2e-4", TRAIN),
    ("mhmd_builder/historynet/train.py", "betas: tuple[float, float] = (0.5, 0.999)",
     "betas: tuple[float, float] = (0.9, 0.999)", TRAIN),
    ("mhmd_builder/historynet/train.py", "batch_size: int = 16", "batch_size: int = 32", TRAIN),
    ("mhmd_builder/historynet/train.py", "epochs: int = 8", "epochs: int = 10", TRAIN),
    ("mhmd_builder/historynet/train.py", "settings.lr, betas=settings.betas", "settings.lr, betas=(0.9, 0.999)", TRAIN),
    ("mhmd_builder/historynet/losses.py", '"paper": LossWeights(l2_ab=1.0, class_kl=0.003',
     '"paper": LossWeights(l2_ab=1.0, class_kl=0.03', TRAIN),
    ("mhmd_builder/historynet/losses.py", "wgan=0.01, info_kl=0.0003", "wgan=0.01, info_kl=0.003", TRAIN),
    ("mhmd_builder/historynet/train.py", '"recommended": PresetSchedule("softmax", 200)',
     '"recommended": PresetSchedule("official", 200)', TRAIN),
    ("mhmd_builder/historynet/train.py", "schedule.warmup_steps if settings.warmup_steps is None else settings.warmup_steps",
     "settings.warmup_steps or schedule.warmup_steps", TRAIN),
    ("mhmd_builder/historynet/losses.py", "l2_ab=2.0, class_kl=0.002, parsing_l2=0.002",
     "l2_ab=2.0, class_kl=0.002, parsing_l2=0.003", TRAIN),
    ("mhmd_builder/extract.py", "round(timestamp * 1000)", "int(timestamp * 1000)", EXTRACT),
    ("mhmd_builder/relabel.py", 'if self.settings.override_human or m.get("label_source") != "human"]',
     "]", RELABEL),
    ("mhmd_builder/relabel.py", 'm.get("label_source") != "human"]', 'm.get("label_source") is None]', RELABEL),
    ("mhmd_builder/relabel.py", "for sample, old, new in zip(batch, metas, new_metas)]",
     "for sample, old, new in zip(batch[::-1], metas[::-1], new_metas[::-1])]", RELABEL),
    ("mhmd_builder/relabel.py", "changes = Counter(zip(labels.before, labels.after))",
     "changes = Counter(zip(labels.after, labels.before))", RELABEL),
    ("mhmd_builder/relabel.py", 'label_fields(label, "model", row["label_confidence"])',
     'label_fields(label, "model", 1.0)', RELABEL),
    ("mhmd_builder/relabel.py", '"override_human": settings.override_human,', '"override_human": False,', RELABEL),
    ("mhmd_builder/relabel.py", "split_entry(Counter(part.movie), Counter(part.after))",
     "split_entry(Counter(part.movie), Counter(part.before))", RELABEL),
    ("mhmd_builder/labeler.py", "len(allowed)), 1)", "len(allowed)), 1, largest=False)", LABELER),
    ("mhmd_builder/labeler.py", "if allowed is not None:", "if False:", LABELER),
    ("mhmd_builder/labeler_train.py", "0 < frames.get(c, 0) < MIN_VALIDATION_FRAMES",
     "0 < frames.get(c, 0) <= MIN_VALIDATION_FRAMES", SELECTION),
    ("mhmd_builder/labeler.py", "logits.softmax(1).topk(", "logits.sigmoid().topk(", LABELER),
    ("mhmd_builder/labeler.py", "min(3, logits.shape[1] if allowed is None else len(allowed))",
     "min(3, logits.shape[1])", LABELER),
    ("mhmd_builder/labeler.py", "return (batch - mean) / std", "return batch - mean", LABELER),
    ("mhmd_builder/labeler.py", ".permute(0, 3, 1, 2)", ".permute(0, 3, 2, 1)", LABELER),
    ("mhmd_builder/label.py",
     'labels = {f["frame_id"]: int(human[f["frame_id"]]) for f in listing if f["frame_id"] in human}', "labels = {}",
     LABEL),
    ("mhmd_builder/label.py", 'todo = [f for f in frames if f["frame_id"] not in human]', "todo = frames", LABEL),
    ("mhmd_builder/label.py", 'allowed = partition.info["allowed"]', "allowed = None", LABEL),
    ("mhmd_builder/label.py", "if era is None and nationality is None:", "if era is None or nationality is None:",
     LABEL),
    ("mhmd_builder/label.py", '"label_source": "human", "label_confidence": 1.0',
     '"label_source": "human", "label_confidence": 0.5', LABEL),
]


def copy_tree(target: Path) -> None:
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache"))


def run_tests(copy: Path, tests: list[str]) -> bool:
    """True when the tests pass."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=copy, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return done.returncode == 0


def main(only: str = "") -> int:
    mutations = [m for m in MUTATIONS if only in m[0]]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        copy_tree(copy)
        for tests in {tuple(m[3]) for m in mutations}:  # a selection failing already would catch everything
            if not run_tests(copy, list(tests)):
                raise SystemExit(f"the unmutated tests fail: {' '.join(tests)}")
        caught = 0
        print(f"{'mutation':<90} {'result':<9} seconds")
        for path, original, replacement, tests in mutations:
            source = copy / path
            text = source.read_text()
            if text.count(original) != 1:
                raise SystemExit(f"{path}: {original!r} occurs {text.count(original)} times, not once")
            source.write_text(text.replace(original, replacement))
            start = time.perf_counter()
            try:
                survived = run_tests(copy, tests)
            finally:
                source.write_text(text)
            caught += not survived
            label = f"{Path(path).name}: {original.strip()!r} -> {replacement.strip()!r}"
            print(f"{label[:90]:<90} {'survived' if survived else 'caught':<9} {time.perf_counter() - start:.1f}",
                  flush=True)
        print(f"score: {caught}/{len(mutations)} caught")
        return 0 if caught == len(mutations) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
