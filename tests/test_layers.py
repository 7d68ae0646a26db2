"""The layers of docs/ARCHITECTURE.md: import contracts hold, and every package's error is one InputError."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cost_models.errors import CostModelError
from echo_exec.errors import ExecError
from echosim.cli import main
from echosim.errors import UserError
from echosim.sim.errors import SimError
from echosim.spec.errors import InputError, SpecError
from echosim.spec.policies import ConfigError
from echosim.validate.errors import ValidationError
from traces.errors import TraceError

ROOT = Path(__file__).resolve().parents[1]
ERRORS = [SpecError, ConfigError, TraceError, CostModelError, SimError, ExecError, ValidationError]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed (pip install -e .[test])")
def test_import_contracts_hold():
    out = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


@pytest.mark.parametrize("cls", ERRORS)
def test_each_layer_error_is_an_input_error_naming_file_line_field(cls):
    assert issubclass(cls, InputError) and issubclass(cls, ValueError) and UserError is InputError
    exc = cls("must be > 0", path="t.jsonl", line=3, field="output_tokens")
    assert str(exc) == "t.jsonl:3: field 'output_tokens': must be > 0"
    assert (exc.path, exc.line, exc.field) == ("t.jsonl", 3, "output_tokens")


def test_the_core_imports_no_backend():
    # a fresh interpreter: importing the whole core loads neither torch nor simpy nor another layer
    code = ("import sys, echosim.spec.policies, echosim.spec.pack, echosim.spec.verify, echosim.spec.calibrate, "
            "echosim.spec.records; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'simpy', 'scipy', 'pandas', 'cost_models', 'traces', 'echo_exec') "
            "or m.startswith(('echosim.sim', 'echosim.commands', 'echosim.validate'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("argv,where", [
    (["run", "--trace", "{bad}", "--no-progress"], "bad.jsonl:2"),        # traces: TraceError
    (["run", "--model", "no-such-model", "--concurrency", "2", "--requests", "2", "--no-progress"],
     "no-such-model"),                                                    # cost models: CostModelError
    (["run", "--policy", "echo", "--set", "steps=0", "--concurrency", "2", "--requests", "2", "--no-progress"],
     "steps"),                                                            # the core: ConfigError
])
def test_cli_prints_each_layer_error_as_one_line(tmp_path, capsys, argv, where):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 0, "prompt_tokens": 10, "output_tokens": 5}\n{"arrival_s": 1, "prompt_tokens": -4}\n')
    argv = [a.replace("{bad}", str(bad)) for a in argv]
    assert main(argv + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("echosim: error: ") and "\n" not in err and where in err, err
