"""Stage 1, rectification (`--Transformation None | TPS`).

TPS is the thin-plate-spline spatial transformer of RARE: a small CNN regresses F fiducial
points C' on the input image, a thin-plate spline that maps the fixed points C onto C' gives a
sampling grid for the rectified (imgH x imgW) image, and the image is resampled bilinearly.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import lookup
from utils import UserError

RBF_EPS = 1e-6  # keeps log() finite where a grid point falls on a fiducial point


def fiducial_points(num_fiducial):
    """The fixed points C (F x 2, float64): F/2 evenly along the top edge y=-1, F/2 along the bottom y=+1."""
    half = num_fiducial // 2
    x = torch.linspace(-1.0, 1.0, half, dtype=torch.float64)
    top = torch.stack([x, torch.full_like(x, -1.0)], dim=1)
    bottom = torch.stack([x, torch.full_like(x, 1.0)], dim=1)
    return torch.cat([top, bottom])


def slanted_points(num_fiducial):
    """The original code's initial C' (RARE, Fig. 6a): a sheared band, top y 0 -> -1, bottom y 1 -> 0."""
    half = num_fiducial // 2
    x = torch.linspace(-1.0, 1.0, half, dtype=torch.float64)
    top = torch.stack([x, torch.linspace(0.0, -1.0, half, dtype=torch.float64)], dim=1)
    bottom = torch.stack([x, torch.linspace(1.0, 0.0, half, dtype=torch.float64)], dim=1)
    return torch.cat([top, bottom])


# What localization_fc2 predicts before training (its weight starts at zero, so C' = its bias).
# 'identity' (C' = C) makes the untrained rectifier the identity mapping; 'slanted' is the original
# code's choice. Loaded checkpoints overwrite the bias, so this only matters when training from scratch.
INITIAL_POINTS = {"identity": fiducial_points, "slanted": slanted_points}


def _tps_kernel(r, eps):
    return r.square() * torch.log(r + eps)


def _inverse_system_matrix(C):
    """inv(Delta_C), (F+3) x (F+3): the linear map from the targets [C'; 0] to the spline's
    coefficients [affine (3) ; radial weights (F)]."""
    n = C.shape[0]
    dist = (C[:, None, :] - C[None, :, :]).norm(dim=2)
    dist.fill_diagonal_(1.0)  # U(0) = 0; r = 1 gives r^2 log r = 0 without a 0 * log 0
    kernel = _tps_kernel(dist, 0.0)
    delta = torch.zeros(n + 3, n + 3, dtype=C.dtype)
    delta[:n, 0] = 1.0
    delta[:n, 1:3] = C
    delta[:n, 3:] = kernel
    delta[n:n + 2, 3:] = C.T
    delta[n + 2, 3:] = 1.0
    return torch.linalg.inv(delta)


def _lifted_grid(C, height, width):
    """P_hat, (height*width) x (F+3): each output pixel centre p as [1, p, U(|p - C_j|)]."""
    xs = (torch.arange(-width, width, 2, dtype=C.dtype) + 1.0) / width
    ys = (torch.arange(-height, height, 2, dtype=C.dtype) + 1.0) / height
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    P = torch.stack([grid_x, grid_y], dim=2).reshape(-1, 2)  # row-major over (y, x)
    dist = (P[:, None, :] - C[None, :, :]).norm(dim=2)
    return torch.cat([torch.ones(P.shape[0], 1, dtype=C.dtype), P, _tps_kernel(dist, RBF_EPS)], dim=1)


class LocalizationNetwork(nn.Module):
    """Regresses the F fiducial points C' (B x F x 2, fp32) from the input image."""

    def __init__(self, num_fiducial, in_channels, initial_points="identity"):
        super().__init__()
        self.num_fiducial = num_fiducial
        layers, channels = [], in_channels
        for i, width in enumerate((64, 128, 256, 512)):
            if i:
                layers.append(nn.MaxPool2d(2, 2))
            layers += [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
            channels = width
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.conv = nn.Sequential(*layers)
        self.localization_fc1 = nn.Sequential(nn.Linear(512, 256), nn.ReLU(True))
        self.localization_fc2 = nn.Linear(256, 2 * num_fiducial)
        with torch.no_grad():
            self.localization_fc2.weight.zero_()
            self.localization_fc2.bias.copy_(INITIAL_POINTS[initial_points](num_fiducial).reshape(-1))

    def forward(self, image):
        hidden = self.localization_fc1(self.conv(image).flatten(1))
        fc2 = self.localization_fc2
        with torch.autocast(image.device.type, enabled=False):
            # the points set the whole sampling grid: a bf16/fp16 rounding here shifts every pixel
            points = F.linear(hidden.float(), fc2.weight.float(), fc2.bias.float())
        return points.view(-1, self.num_fiducial, 2)


class GridGenerator(nn.Module):
    """Maps C' (B x F x 2) to the sampling grid (B x H x W x 2) of the rectified image."""

    def __init__(self, num_fiducial, out_size):
        super().__init__()
        self.out_size = tuple(out_size)
        C = fiducial_points(num_fiducial)
        # built in float64 and stored as float32 buffers, so `.to()` moves them and checkpoints carry them
        self.register_buffer("inv_delta_C", _inverse_system_matrix(C).float())
        self.register_buffer("P_hat", _lifted_grid(C, *self.out_size).float())

    def forward(self, points):
        with torch.autocast(points.device.type, enabled=False):
            num_fiducial = points.shape[1]
            # the targets are [C'; 0 0 0], so only the first F columns of inv(Delta_C) contribute
            coefficients = self.inv_delta_C[:, :num_fiducial].float() @ points.float()  # B x F+3 x 2
            grid = self.P_hat.float() @ coefficients  # B x n x 2
        return grid.view(points.shape[0], *self.out_size, 2)


class TPS(nn.Module):
    """Thin-plate-spline rectifier: (B, C, h, w) -> (B, C, imgH, imgW)."""

    def __init__(self, num_fiducial, out_size, in_channels, initial_points="identity"):
        super().__init__()
        self.LocalizationNetwork = LocalizationNetwork(num_fiducial, in_channels, initial_points)
        self.GridGenerator = GridGenerator(num_fiducial, out_size)

    def forward(self, image):
        grid = self.GridGenerator(self.LocalizationNetwork(image))
        with torch.autocast(image.device.type, enabled=False):
            rectified = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border",
                                      align_corners=True)
        return rectified.to(image.dtype)


class NoTransformation(nn.Identity):
    """`--Transformation None`: the image goes through unchanged (no parameters)."""


def _build_tps(opt):
    num_fiducial = opt.num_fiducial
    if num_fiducial < 4 or num_fiducial % 2:
        raise UserError(f"--num_fiducial {num_fiducial}: must be an even number of at least 4 (default 20)")
    return TPS(num_fiducial, (opt.imgH, opt.imgW), opt.input_channel)


TRANSFORMATIONS = {
    "None": lambda opt: NoTransformation(),
    "TPS": _build_tps,
}


def build_transformation(opt):
    return lookup(TRANSFORMATIONS, "Transformation", opt.Transformation)(opt)
