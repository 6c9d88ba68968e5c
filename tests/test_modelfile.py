import pytest
from metaeol_edge.modelfile import inspect_gguf, truncate_gguf

from metaeol_edge.errors import ModelError


def test_reads_the_header_of_a_real_model(smollm2):
    info = inspect_gguf(smollm2)
    assert (info.architecture, info.n_embd, info.n_layer) == ("llama", 576, 30)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        inspect_gguf(tmp_path / "absent.gguf")


def test_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ModelError, match="not a GGUF model file"):
        inspect_gguf(path)


@pytest.mark.parametrize("keep", [2_000, 5_000_000, -1])
def test_truncated_file(tmp_path, smollm2, keep):
    data = smollm2.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(ModelError, match="truncated|damaged"):
        inspect_gguf(path)


def test_a_truncated_copy_keeps_only_the_lower_blocks(smollm2, tmp_path):
    dst = tmp_path / "first12.gguf"
    truncate_gguf(smollm2, dst, 12)
    info = inspect_gguf(dst)
    assert (info.architecture, info.n_embd, info.n_layer) == ("llama", 576, 12)
    assert info.size < 0.7 * smollm2.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["first12.gguf"]  # no temporary file left
    for bad in (0, 30):
        with pytest.raises(ValueError, match="n_blocks"):
            truncate_gguf(smollm2, tmp_path / "bad.gguf", bad)
