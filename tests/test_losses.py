"""MEAL V2 losses on hand-computed values and gradients."""

import math

import torch

from mealv2.distill.losses import Discriminator, discriminator_loss, soft_cross_entropy


def test_soft_cross_entropy_value_and_gradient():
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # softmax = [0.25, 0.75]
    target = torch.tensor([[0.5, 0.5]])
    loss = soft_cross_entropy(logits, target)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[0.25 - 0.5, 0.75 - 0.5]]))


def test_soft_cross_entropy_is_a_batch_mean():
    logits = torch.randn(4, 5)
    target = torch.softmax(torch.randn(4, 5), -1)
    rows = [soft_cross_entropy(logits[i:i + 1], target[i:i + 1]) for i in range(4)]
    torch.testing.assert_close(soft_cross_entropy(logits, target), torch.stack(rows).mean())


def test_discriminator_shape_follows_the_official_code():
    layers = [m for m in Discriminator(1000).layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(1000, 125), (125, 15), (15, 2)]
    assert isinstance(Discriminator(10).layers[-1], torch.nn.ReLU)
    small = [m.out_features for m in Discriminator(10).layers if isinstance(m, torch.nn.Linear)]
    assert small == [8, 8, 2]


class Fixed(torch.nn.Module):
    """A 'discriminator' returning its input's first two columns, for hand computation."""

    def forward(self, x):
        return x[:, :2]


def test_discriminator_loss_targets_and_mean():
    student = torch.tensor([[2.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[0.5, 3.0]])
    loss = discriminator_loss(Fixed(), student, teacher)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731 - BCE with logits: target 1 → softplus(-z), 0 → softplus(z)
    expected = (softplus(-2.0) + softplus(-1.0) + softplus(0.5) + softplus(-3.0)) / 4
    assert abs(loss.item() - expected) < 1e-6
    loss.backward()
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    torch.testing.assert_close(student.grad, torch.tensor([[(sigmoid(2.0) - 1) / 4, sigmoid(-1.0) / 4]]))
