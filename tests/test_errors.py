"""One error path: bad input gives exactly one stderr line and exit code 1."""
from __future__ import annotations

import pytest

from kvq_cli.cli.app import app


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvq: error: ")
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_unknown_model_lists_close_names(runner):
    r = runner.invoke(app, ["chat", "smollm2-360", "--prompt", "hi"])
    assert_one_line_error(r, "unknown model 'smollm2-360'", "smollm2-360m")


def test_unknown_model_for_pull(runner):
    r = runner.invoke(app, ["pull", "gpt-17"])
    assert_one_line_error(r, "unknown model 'gpt-17'", "kvq models")


def test_missing_file(runner, tmp_path):
    missing = tmp_path / "nope.gguf"
    assert_one_line_error(runner.invoke(app, ["inspect", str(missing)]), "no such file")
    assert_one_line_error(runner.invoke(app, ["chat", str(missing), "-p", "hi"]), "no such file")


def test_not_gguf(runner, tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 definitely a zip file" * 10)
    assert_one_line_error(runner.invoke(app, ["inspect", str(p)]), "not a GGUF file")
    assert_one_line_error(runner.invoke(app, ["chat", str(p), "-p", "hi"]), "not a GGUF file")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_gguf(runner, tmp_path, model_path, keep):
    data = model_path.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * keep)])
    assert_one_line_error(runner.invoke(app, ["inspect", str(p)]), "truncated")
    assert_one_line_error(runner.invoke(app, ["chat", str(p), "-p", "hi"]), "truncated")


def test_truncated_header(runner, tmp_path, tiny_gguf):
    p = tmp_path / "head.gguf"
    p.write_bytes(tiny_gguf.read_bytes()[:40])
    assert_one_line_error(runner.invoke(app, ["inspect", str(p)]), "truncated or corrupt")


def test_bad_kv_value(runner):
    line = assert_one_line_error(runner.invoke(app, ["chat", "--kv", "q3_k", "-p", "hi"]),
                                 "unknown --kv value 'q3_k'")
    assert "stock-f16" in line and "stock-q4_0" in line


def test_bad_numbers(runner):
    assert_one_line_error(runner.invoke(app, ["chat", "--ctx", "-5", "-p", "hi"]), "--ctx")
    assert_one_line_error(runner.invoke(app, ["chat", "--max-tokens", "0", "-p", "hi"]), "--max-tokens")


def test_atomic_output_leaves_nothing_on_failure_and_uses_umask_mode(tmp_path):
    import os

    from kvq_cli.gguf.write import atomic_output

    out = tmp_path / "o.json"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    old = os.umask(0o022)
    try:
        with atomic_output(out) as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert out.read_text() == "{}" and (out.stat().st_mode & 0o777) == 0o644
    assert list(tmp_path.iterdir()) == [out]
