"""What a task measures, said once: its metrics (names, units, which way is better, how they are
shown), the evaluation split, the x axis of its curves and what its studies collect. Each task
(``tasks.py``) names its ``Measures``; rows, tables, figures and the CLI read them from there,
never from the keys a metrics row happens to hold."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One quantity: ``label`` and ``unit`` as shown, ``scale`` and ``digits`` to show a value
    (value × scale), and whether a higher value is better."""

    name: str
    label: str
    unit: str
    scale: float
    digits: int
    higher_is_better: bool

    def show(self, value: float) -> str:
        return f"{value * self.scale:.{self.digits}f}"

    def cell(self, value: float) -> str:
        """As a table cell: ``show`` with a percent sign for percentages."""
        return self.show(value) + ("%" if self.unit == "%" else "")


ACCURACY = Metric("acc", "accuracy", "%", 100, 2, True)
BITS_PER_BYTE = Metric("bpb", "bits per byte", "bpb", 1, 4, False)
LOSS = Metric("loss", "loss", "nats", 1, 4, False)
EIGENVALUE = Metric("eigenvalue", "top Hessian eigenvalue", "", 1, 1, False)
SECONDS = Metric("seconds", "wall time", "min", 1 / 60, 1, False)
RATE = Metric("tokens_per_second", "tokens/s", "tokens/s", 1, 0, True)


@dataclass(frozen=True)
class Measures:
    """What runs of one kind of task measure.

    ``split`` names the evaluation split in metrics rows (``test_acc``, ``valid_bpb``);
    ``headline`` is the metric a run is judged by (the curves, the tables' first column); ``x`` is
    the rows' x axis. ``study`` lists what a study collects per run (summary keys, each a mean ±
    std over seeds), ``compared`` what it compares with its baseline, seed by seed, and
    ``leading`` and ``trailing`` the study table's columns (title, key, width) before and after
    its communication columns (``after_decay``: with the rounds after the first LR decay)."""

    kind: str
    split: str
    split_label: str
    headline: Metric
    x: str
    x_label: str
    study: dict[str, Metric]
    compared: tuple[str, ...]
    leading: tuple[tuple[str, str, int], ...]
    trailing: tuple[tuple[str, str, int], ...]
    after_decay: bool

    @property
    def curve(self) -> str:
        """The headline's key in metrics rows."""
        return f"{self.split}_{self.headline.name}"

    @property
    def final(self) -> str:
        """The headline's key in a run's summary."""
        return f"final_{self.curve}"

    @property
    def label(self) -> str:
        """The headline as an axis label."""
        unit = f" ({self.headline.unit})" if self.headline.unit == "%" else ""
        return f"{self.split_label} {self.headline.label}{unit}"


IMAGE = Measures(
    kind="image",
    split="test",
    split_label="test",
    headline=ACCURACY,
    x="epoch",
    x_label="epoch",
    study={
        "final_test_acc": ACCURACY,
        "best_test_acc": ACCURACY,
        "final_local_test_acc": ACCURACY,
        "final_train_loss": LOSS,
        "wall_seconds": SECONDS,
        "eigenvalue": EIGENVALUE,
    },
    compared=("final_test_acc", "best_test_acc", "eigenvalue"),
    leading=(
        ("final test %", "final_test_acc", 14),
        ("best test %", "best_test_acc", 14),
        ("local models %", "final_local_test_acc", 14),
    ),
    trailing=(("eigenvalue", "eigenvalue", 13), ("wall min", "wall_seconds", 10)),
    after_decay=True,
)
TEXT = Measures(
    kind="text",
    split="valid",
    split_label="validation",
    headline=BITS_PER_BYTE,
    x="tokens",
    x_label="training tokens",
    study={
        "final_valid_bpb": BITS_PER_BYTE,
        "best_valid_bpb": BITS_PER_BYTE,
        "final_local_valid_bpb": BITS_PER_BYTE,
        "final_valid_loss": LOSS,
        "final_train_loss": LOSS,
        "wall_seconds": SECONDS,
        "tokens_per_second": RATE,
    },
    compared=("final_valid_bpb", "best_valid_bpb"),
    leading=(
        ("final valid bpb", "final_valid_bpb", 17),
        ("valid loss", "final_valid_loss", 17),
        ("local models bpb", "final_local_valid_bpb", 17),
    ),
    trailing=(("tokens/s", "tokens_per_second", 16), ("wall min", "wall_seconds", 10)),
    after_decay=False,
)
