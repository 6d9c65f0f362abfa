"""benchmarks/caml_logs.py: parsing the official CAML training log and reading a resumable run's checkpoint."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
_spec = importlib.util.spec_from_file_location("caml_logs", REPO / "benchmarks" / "caml_logs.py")
caml_logs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(caml_logs)

LOG = """[19:17:31.930] Namespace(base_lr=0.01, batch_size=4, labelnum=8, max_iteration=15000, seed=3407)
[19:17:36.014] 4 itertations per epoch
[19:17:39.635] iteration 1 : loss : 0.752805, loss_s: 1.489633, loss_c: 0.467822, loss_o: 14.354601
[19:17:41.464] iteration 2 : loss : 0.724620, loss_s: 1.432738, loss_c: 0.438210, loss_o: 15.726142
[20:07:51.852] save best model to ./model/LA_CAML_8_x/caml3d_v1/iter_800_dice_0.6066526585948433.pth
"""


def test_official_log_lines_give_every_term_and_the_kept_checkpoints() -> None:
    rows, saved = caml_logs.parse_official(LOG)
    assert rows == [{"iteration": 1, "loss": 0.752805, "loss_s": 1.489633, "loss_c": 0.467822, "loss_o": 14.354601},
                    {"iteration": 2, "loss": 0.72462, "loss_s": 1.432738, "loss_c": 0.43821, "loss_o": 15.726142}]
    assert saved == [(800, 0.6066526585948433)]


def test_the_committed_official_numbers_cover_the_first_iterations() -> None:
    rows, header = caml_logs.read_official(8)
    assert "Herschel555/CAML commit" in header and len(rows) == caml_logs.KEEP
    assert rows[0] == {"iteration": 1.0, "loss": 0.752805, "loss_s": 1.489633, "loss_c": 0.467822,
                       "loss_o": 14.354601}
    # loss = 0.5 loss_s + ramp (loss_c + 0.05 loss_o) with a ramp near 0 at the start: the definitions line up
    assert abs(rows[0]["loss"] - 0.5 * rows[0]["loss_s"]) < 0.01


def test_checkpoint_iteration_is_the_last_logged_multiple_of_checkpoint_every(tmp_path: Path) -> None:
    assert caml_logs.checkpoint_iteration(tmp_path) == 0
    (tmp_path / "config.yaml").write_text("checkpoint_every: 5\n")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(1, 13)))
    assert caml_logs.checkpoint_iteration(tmp_path) == 10
