"""Stage 3, context along the text line (`--SequenceModeling None | BiLSTM`).

Input and output are (B, T, features); every module exposes `output_size`, which the prediction
stage takes as its input size.
"""
import torch.nn as nn

from modules import lookup


class BidirectionalLSTM(nn.Module):
    """A bidirectional LSTM followed by a linear projection of the two directions."""

    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.rnn = nn.LSTM(input_size, hidden_size, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(2 * hidden_size, output_size)

    def forward(self, sequence):
        self.rnn.flatten_parameters()  # weights can lose cuDNN's contiguous layout after .to() / replication
        recurrent, _ = self.rnn(sequence)
        return self.linear(recurrent)


class BiLSTM(nn.Sequential):
    """Two stacked BidirectionalLSTM blocks, both of width `hidden_size`."""

    def __init__(self, input_size, hidden_size):
        super().__init__(BidirectionalLSTM(input_size, hidden_size, hidden_size),
                         BidirectionalLSTM(hidden_size, hidden_size, hidden_size))
        self.output_size = hidden_size


class NoSequenceModeling(nn.Identity):
    """`--SequenceModeling None`: the visual features go straight to the prediction stage."""

    def __init__(self, input_size):
        super().__init__()
        self.output_size = input_size


SEQUENCE_MODELS = {
    "None": lambda opt, input_size: NoSequenceModeling(input_size),
    "BiLSTM": lambda opt, input_size: BiLSTM(input_size, opt.hidden_size),
}


def build_sequence_modeling(opt, input_size):
    return lookup(SEQUENCE_MODELS, "SequenceModeling", opt.SequenceModeling)(opt, input_size)
