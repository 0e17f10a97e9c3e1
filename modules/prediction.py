"""Stage 4, the output head (`--Prediction CTC | Attn`).

Every head is called as `head(features, text, is_train)` with features (B, T, input_size) and
returns logits (B, steps, num_class): one step per feature column for CTC, batch_max_length + 1
steps for Attn (the last one for the end token [s]).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import lookup

GO_TOKEN = 0  # the attention converter's start token; class 1 is the end token [s]


class CTC(nn.Linear):
    """Per-column class scores; a plain linear layer, so its parameters are `Prediction.weight/bias`."""

    def __init__(self, input_size, num_class):
        super().__init__(input_size, num_class)

    def forward(self, features, text=None, is_train=True):
        return super().forward(features)


class AttentionCell(nn.Module):
    """One step of the Bahdanau-style decoder: attend over the features, then an LSTMCell over
    [context ; one-hot(previous character)]."""

    def __init__(self, input_size, hidden_size, num_embeddings):
        super().__init__()
        self.i2h = nn.Linear(input_size, hidden_size, bias=False)
        self.h2h = nn.Linear(hidden_size, hidden_size)
        self.score = nn.Linear(hidden_size, 1, bias=False)
        self.rnn = nn.LSTMCell(input_size + num_embeddings, hidden_size)

    def forward(self, state, features, projected, char_onehots):
        """`projected` = i2h(features), which does not change between steps, so callers compute it once."""
        energy = self.score(torch.tanh(projected + self.h2h(state[0]).unsqueeze(1)))  # B x T x 1
        alpha = torch.softmax(energy, dim=1)
        context = torch.bmm(alpha.transpose(1, 2), features).squeeze(1)  # B x input_size
        inputs = torch.cat([context, char_onehots.to(context.dtype)], dim=1)
        return self.rnn(inputs, state), alpha


class Attention(nn.Module):
    """Attention decoder over batch_max_length + 1 steps.

    Training (`is_train=True`) feeds the ground truth: `text` is the converter's encoding without its
    last column, (B, batch_max_length + 1) with [GO] in column 0. Otherwise decoding is greedy: it
    starts from text[:, 0] ([GO]; a zero tensor or None will do) and feeds back its own argmax."""

    def __init__(self, input_size, hidden_size, num_class, batch_max_length):
        super().__init__()
        self.attention_cell = AttentionCell(input_size, hidden_size, num_class)
        self.generator = nn.Linear(hidden_size, num_class)
        self.hidden_size = hidden_size
        self.num_class = num_class
        self.num_steps = batch_max_length + 1

    def forward(self, features, text=None, is_train=True):
        projected = self.attention_cell.i2h(features)
        zeros = torch.zeros(features.shape[0], self.hidden_size, device=features.device,
                            dtype=self.generator.weight.dtype)
        state = (zeros, zeros)
        if is_train:
            return self._teacher_forced(features, projected, state, text)
        return self._greedy(features, projected, state, text)

    def _onehot(self, tokens):
        return F.one_hot(tokens.long(), self.num_class).to(self.generator.weight.dtype)

    def _teacher_forced(self, features, projected, state, text):
        if text is None or text.shape[1] < self.num_steps:
            got = "no text" if text is None else f"{text.shape[1]} columns"
            raise ValueError(f"Attn training needs text of batch_max_length + 1 = {self.num_steps} columns "
                             f"([GO] and the characters), got {got}")
        onehots = self._onehot(text[:, :self.num_steps])
        hiddens = []
        for step in range(self.num_steps):
            state, _ = self.attention_cell(state, features, projected, onehots[:, step])
            hiddens.append(state[0])
        return self.generator(torch.stack(hiddens, dim=1))

    def _greedy(self, features, projected, state, text):
        if text is None:
            tokens = torch.full((features.shape[0],), GO_TOKEN, dtype=torch.long, device=features.device)
        else:
            tokens = text[:, 0]
        steps = []
        for _ in range(self.num_steps):
            state, _ = self.attention_cell(state, features, projected, self._onehot(tokens))
            logits = self.generator(state[0])
            steps.append(logits)
            tokens = logits.argmax(dim=1)
        return torch.stack(steps, dim=1)


PREDICTIONS = {
    "CTC": lambda opt, input_size: CTC(input_size, opt.num_class),
    "Attn": lambda opt, input_size: Attention(input_size, opt.hidden_size, opt.num_class, opt.batch_max_length),
}


def build_prediction(opt, input_size):
    return lookup(PREDICTIONS, "Prediction", opt.Prediction)(opt, input_size)
