import pytest

from metaeol_edge.errors import ModelError
from metaeol_edge.modelfile import inspect_gguf


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
