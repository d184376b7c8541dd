"""`hybrid trial`: one trial of train.py on a profile, with knob values set from the command line."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from harness.profiles import get_profile
from harness.result import TrialResult
from hybrid.errors import UserError
from hybrid.paths import project_file
from hybrid.space import check_against_code, load_space


def parse_assignments(assignments: list[str], space) -> dict:  # noqa: ANN001
    """`KNOB=VALUE` strings into a checked config of the space."""
    config = {}
    for item in assignments:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UserError(f"--set expects KNOB=VALUE, got {item!r}")
        if name not in space.knobs:
            raise UserError(f"unknown knob {name!r}: the search space has {', '.join(space.knobs)}")
        config[name] = space.knobs[name].parse(text)
    return space.check(config)


def run_single_trial(*, profile: str | None, assignments: list[str], train_py: Path | None, space_path: Path | None,
                     seed: int, vram_cap_gb: float | None, out: Path | None, sandbox: str = "auto",
                     as_written: bool = False) -> TrialResult:
    """One trial of train.py: knobs from `assignments`, the others at the space's defaults for the profile, or,
    `as_written`, at the values the script holds (an exported train.py: `hybrid best --export`)."""
    from harness.runner import run_trial

    from hybrid.objectives import ensure_prepared

    prof = get_profile(profile)
    ensure_prepared(prof)
    code_path = train_py or project_file("train.py")
    try:
        code = Path(code_path).read_text()
    except OSError as e:
        raise UserError(f"cannot read {code_path}: {e.strerror}") from None
    space = load_space(space_path or project_file("search_space.yaml"), prof.name)
    assigned = parse_assignments(assignments, space)
    if not as_written:
        check_against_code(space, code)
    config = assigned if as_written else space.complete(assigned)
    return run_trial(code, config, prof, out or _new_trial_dir(Path("runs") / "trials"), seed=seed,
                     vram_cap_gb=vram_cap_gb, sandbox=sandbox)


def _new_trial_dir(root: Path) -> Path:
    """A fresh folder under root named by the time: two trials started in the same second get one each."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=root))
