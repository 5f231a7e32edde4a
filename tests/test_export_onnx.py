"""export_onnx.py: the ONNX export computes what PyTorch does."""
import config
from export_onnx import export, max_difference
from models import load_checkpoint


def test_onnx_matches_pytorch(tmp_path):
    net, _ = load_checkpoint(config.RELEASED_MODEL)
    path = export(net, str(tmp_path / "m.onnx"))
    assert max_difference(net, path, batch=5) <= 1e-4
