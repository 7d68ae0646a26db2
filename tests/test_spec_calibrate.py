import json

import numpy as np
import pytest

from echosim.cli import main
from echosim.spec.calibrate import auroc, calibrate
from echosim.spec.policies import load_policy
from echosim.spec.records import NodeRecords, read_records, write_records


def synthetic_records(n=3000, sweet=3, seed=0):
    """Acceptance at depth `sweet` depends sharply on c (c > 0.3: 95%, else 5%); elsewhere c says nothing."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n):
        reached = True
        for d in range(1, 6):
            c = rng.uniform(0, 1)
            p = (0.95 if c > 0.3 else 0.05) if d == sweet else 0.95
            reached = reached and rng.uniform() < p
            rows.append((g, 7, d, 0, c, c, reached))
            rows.append((g, 7, d, 1, c / 3, c / 3, False))  # a sibling that is never accepted
    a = np.array(rows, dtype=object)
    return NodeRecords(step=a[:, 0].astype(np.int64), request=a[:, 1].astype(np.int64),
                       depth=a[:, 2].astype(np.int32), rank=a[:, 3].astype(np.int32),
                       draft_prob=a[:, 4].astype(float), path_prob=a[:, 5].astype(float),
                       accepted=a[:, 6].astype(bool))


def test_auroc_known_values():
    assert auroc(np.array([1, 2, 3, 4]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([1, 2, 3, 4]), np.array([1, 1, 0, 0])) == 0.0
    assert auroc(np.array([1, 1, 1, 1]), np.array([1, 0, 1, 0])) == 0.5


def test_calibration_finds_the_sweet_spot_and_its_threshold():
    cal = calibrate(synthetic_records(), max_gates=1, token_cost=0.05)
    best = max(cal.depths, key=lambda s: s.auroc if s.samples > 50 else 0)
    assert best.depth == 3 and best.auroc > 0.75
    assert [d for d, _ in cal.config.gates] == [3]
    tau = cal.config.gates[0][1]
    assert 0.2 <= tau <= 0.4
    assert cal.predicted_gain > 1.0
    # If verification were free, truncating would never pay: no gate.
    free = calibrate(synthetic_records(), max_gates=1, token_cost=0.0)
    assert free.config.gates == [] and free.predicted_gain == pytest.approx(1.0)


def test_calibrate_cli_round_trip(tmp_path, capsys):
    rec = tmp_path / "records.jsonl"
    write_records(rec, synthetic_records(n=1500, seed=1))
    assert len(read_records(rec)) == 15000
    out = tmp_path / "echo.json"
    assert main(["calibrate", "--records", str(rec), "-o", str(out), "--max-gates", "1",
                 "--token-cost", "0.05"]) == 0
    policy = load_policy(out)
    assert policy.name == "echo" and policy.config.gates[0][0] == 3
    assert "AUROC" in capsys.readouterr().out
    assert json.loads(out.read_text())["calibration"]["depths"][2]["depth"] == 3


def test_bad_records_name_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = '{"step": 0, "request": 1, "depth": 1, "rank": 0, "draft_prob": 0.5, "path_prob": 0.5, "accepted": true}'
    bad.write_text(good + "\n" + good.replace('"path_prob": 0.5', '"path_prob": 1.5') + "\n")
    assert main(["calibrate", "--records", str(bad), "-o", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "path_prob" in err and "Traceback" not in err
    bad.write_text(good + "\n{not json\n")
    assert main(["calibrate", "--records", str(bad), "-o", str(tmp_path / "o.json")]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    bad.write_text(good.replace('"accepted": true, ', "").replace(', "accepted": true', "") + "\n")
    assert main(["calibrate", "--records", str(bad), "-o", str(tmp_path / "o.json")]) == 2
    assert "field 'accepted'" in capsys.readouterr().err
