"""Stage 2, convolutional features (`--FeatureExtraction VGG | RCNN | ResNet`).

Each extractor maps (B, input_channel, 32, W) to (B, output_channel, 1, W') and keeps its layers in
`self.ConvNet`, so parameter names match the checkpoints of the deep-text-recognition-benchmark
family. W' is W/4 - 1 for VGG and W/4 + 1 for RCNN and ResNet (24 and 26 at W = 100).
"""
import torch
import torch.nn as nn

from modules import lookup
from utils import UserError


class VGGExtractor(nn.Module):
    """CRNN's VGG: widths oc/8, oc/4, oc/2, oc; the last pools halve only the height."""

    def __init__(self, input_channel, output_channel):
        super().__init__()
        c1, c2, c3, c4 = output_channel // 8, output_channel // 4, output_channel // 2, output_channel
        self.output_channel = output_channel
        self.ConvNet = nn.Sequential(
            nn.Conv2d(input_channel, c1, 3, 1, 1), nn.ReLU(True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(c1, c2, 3, 1, 1), nn.ReLU(True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(c2, c3, 3, 1, 1), nn.ReLU(True),
            nn.Conv2d(c3, c3, 3, 1, 1), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c3, c4, 3, 1, 1, bias=False), nn.BatchNorm2d(c4), nn.ReLU(True),
            nn.Conv2d(c4, c4, 3, 1, 1, bias=False), nn.BatchNorm2d(c4), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c4, c4, 2, 1, 0), nn.ReLU(True),
        )

    def forward(self, image):
        return self.ConvNet(image)


class GRCLUnit(nn.Module):
    """One unrolled step of a gated recurrent convolution layer."""

    def __init__(self, channels):
        super().__init__()
        self.BN_gfu = nn.BatchNorm2d(channels)
        self.BN_grx = nn.BatchNorm2d(channels)
        self.BN_fu = nn.BatchNorm2d(channels)
        self.BN_rx = nn.BatchNorm2d(channels)
        self.BN_Gx = nn.BatchNorm2d(channels)

    def forward(self, gate_input, gate_recurrent, feed_input, feed_recurrent):
        gate = torch.sigmoid(self.BN_gfu(gate_input) + self.BN_grx(gate_recurrent))
        recurrent = self.BN_Gx(self.BN_rx(feed_recurrent) * gate)
        return torch.relu(self.BN_fu(feed_input) + recurrent)


class GRCL(nn.Module):
    """Gated recurrent convolution layer (Wang & Hu, 2017), unrolled `iterations` times.

    The feed-forward terms depend only on the layer's input, so they are computed once; the
    recurrent convolutions are shared by all steps, the batch norms are per step."""

    def __init__(self, in_channels, out_channels, iterations=5, kernel_size=3, padding=1):
        super().__init__()
        self.wgf_u = nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False)
        self.wgr_x = nn.Conv2d(out_channels, out_channels, 1, 1, 0, bias=False)
        self.wf_u = nn.Conv2d(in_channels, out_channels, kernel_size, 1, padding, bias=False)
        self.wr_x = nn.Conv2d(out_channels, out_channels, kernel_size, 1, padding, bias=False)
        self.BN_x_init = nn.BatchNorm2d(out_channels)
        self.GRCL = nn.Sequential(*(GRCLUnit(out_channels) for _ in range(iterations)))

    def forward(self, x):
        gate_input = self.wgf_u(x)
        feed_input = self.wf_u(x)
        state = torch.relu(self.BN_x_init(feed_input))
        for unit in self.GRCL:
            state = unit(gate_input, self.wgr_x(state), feed_input, self.wr_x(state))
        return state


class RCNNExtractor(nn.Module):
    """Gated RCNN: widths oc/8, oc/4, oc/2, oc."""

    def __init__(self, input_channel, output_channel):
        super().__init__()
        c1, c2, c3, c4 = output_channel // 8, output_channel // 4, output_channel // 2, output_channel
        self.output_channel = output_channel
        self.ConvNet = nn.Sequential(
            nn.Conv2d(input_channel, c1, 3, 1, 1), nn.ReLU(True),
            nn.MaxPool2d(2, 2),
            GRCL(c1, c1),
            nn.MaxPool2d(2, 2),
            GRCL(c1, c2),
            nn.MaxPool2d(2, (2, 1), (0, 1)),
            GRCL(c2, c3),
            nn.MaxPool2d(2, (2, 1), (0, 1)),
            nn.Conv2d(c3, c4, 2, 1, 0, bias=False), nn.BatchNorm2d(c4), nn.ReLU(True),
        )

    def forward(self, image):
        return self.ConvNet(image)


class BasicBlock(nn.Module):
    """Residual block of two 3x3 convolutions (stride 1 throughout this network)."""

    def __init__(self, in_channels, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, 1, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


def _conv_bn(in_channels, out_channels, kernel_size, stride=1, padding=1):
    return (nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
            nn.BatchNorm2d(out_channels))


class ResNetBody(nn.Module):
    """The ResNet of FAN / deep-text-recognition-benchmark: blocks [1, 2, 5, 3] of widths
    oc/4, oc/2, oc, oc after a stem of oc/16 and oc/8 channels."""

    BLOCKS = (1, 2, 5, 3)

    def __init__(self, input_channel, output_channel):
        super().__init__()
        w1, w2, w3, w4 = output_channel // 4, output_channel // 2, output_channel, output_channel
        self.conv0_1, self.bn0_1 = _conv_bn(input_channel, output_channel // 16, 3)
        self.conv0_2, self.bn0_2 = _conv_bn(output_channel // 16, output_channel // 8, 3)
        self.relu = nn.ReLU(inplace=True)

        self.maxpool1 = nn.MaxPool2d(2, 2, 0)
        self.layer1 = self._stage(output_channel // 8, w1, self.BLOCKS[0])
        self.conv1, self.bn1 = _conv_bn(w1, w1, 3)

        self.maxpool2 = nn.MaxPool2d(2, 2, 0)
        self.layer2 = self._stage(w1, w2, self.BLOCKS[1])
        self.conv2, self.bn2 = _conv_bn(w2, w2, 3)

        self.maxpool3 = nn.MaxPool2d(2, (2, 1), (0, 1))
        self.layer3 = self._stage(w2, w3, self.BLOCKS[2])
        self.conv3, self.bn3 = _conv_bn(w3, w3, 3)

        self.layer4 = self._stage(w3, w4, self.BLOCKS[3])
        self.conv4_1, self.bn4_1 = _conv_bn(w4, w4, 2, (2, 1), (0, 1))
        self.conv4_2, self.bn4_2 = _conv_bn(w4, w4, 2, 1, 0)

    @staticmethod
    def _stage(in_channels, channels, blocks):
        return nn.Sequential(BasicBlock(in_channels, channels),
                             *(BasicBlock(channels, channels) for _ in range(blocks - 1)))

    def forward(self, x):
        x = self.relu(self.bn0_1(self.conv0_1(x)))
        x = self.relu(self.bn0_2(self.conv0_2(x)))
        x = self.relu(self.bn1(self.conv1(self.layer1(self.maxpool1(x)))))
        x = self.relu(self.bn2(self.conv2(self.layer2(self.maxpool2(x)))))
        x = self.relu(self.bn3(self.conv3(self.layer3(self.maxpool3(x)))))
        x = self.layer4(x)
        x = self.relu(self.bn4_1(self.conv4_1(x)))
        return self.relu(self.bn4_2(self.conv4_2(x)))


class ResNetExtractor(nn.Module):
    def __init__(self, input_channel, output_channel):
        super().__init__()
        self.output_channel = output_channel
        self.ConvNet = ResNetBody(input_channel, output_channel)

    def forward(self, image):
        return self.ConvNet(image)


FEATURE_EXTRACTORS = {
    "VGG": VGGExtractor,
    "RCNN": RCNNExtractor,
    "ResNet": ResNetExtractor,
}


def build_feature_extraction(opt):
    extractor = lookup(FEATURE_EXTRACTORS, "FeatureExtraction", opt.FeatureExtraction)
    if opt.output_channel < 16:
        raise UserError(f"--output_channel {opt.output_channel}: must be at least 16 (default 512)")
    return extractor(opt.input_channel, opt.output_channel)
