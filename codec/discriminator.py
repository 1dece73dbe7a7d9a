"""Multi-resolution STFT discriminator (EnCodec's MS-STFTD idea, sized for a CPU).

Each sub-discriminator looks at the complex STFT (real and imaginary parts as two
channels) at one resolution, so it judges phase as well as magnitude - the thing a
spectral reconstruction loss leaves unsupervised in an iSTFT decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class STFTDiscriminator(nn.Module):
    """One resolution. Input (B, T) audio; output logits (B, 1, F', T') and feature maps."""

    def __init__(self, n_fft: int, hop_length: int, channels: int = 8, max_channels: int = 32):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        # The first layer already halves frequency; each later one halves time and frequency.
        layers = [nn.Conv2d(2, channels, (3, 9), stride=(1, 2), padding=(1, 4))]
        ch = channels
        for _ in range(3):
            nxt = min(ch * 2, max_channels)
            layers.append(nn.Conv2d(ch, nxt, (3, 5), stride=(2, 2), padding=(1, 2)))
            ch = nxt
        layers.append(nn.Conv2d(ch, ch, (3, 3), padding=(1, 1)))
        self.layers = nn.ModuleList(layers)
        self.out = nn.Conv2d(ch, 1, (3, 3), padding=(1, 1))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spec = torch.stft(wav, self.n_fft, self.hop_length, window=self.window, return_complex=True)  # (B, F, T)
        x = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # (B, 2, T, F)
        features = []
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2)
            features.append(x)
        return self.out(x), features


class MultiResolutionSTFTDiscriminator(nn.Module):
    def __init__(self, resolutions: tuple[tuple[int, int], ...] = ((256, 64), (512, 128), (1024, 256)), channels: int = 8):
        super().__init__()
        self.discriminators = nn.ModuleList(STFTDiscriminator(n, h, channels) for n, h in resolutions)

    def forward(self, wav: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """wav (B, T) -> per resolution (logits, feature maps)."""
        return [d(wav) for d in self.discriminators]


def discriminator_loss(real: list, fake: list) -> torch.Tensor:
    """Hinge loss on (logits, features) pairs from real and generated audio."""
    loss = 0.0
    for (lr, _), (lf, _) in zip(real, fake):
        loss = loss + F.relu(1 - lr).mean() + F.relu(1 + lf).mean()
    return loss / len(real)


def generator_adversarial_loss(fake: list) -> torch.Tensor:
    return sum(F.relu(1 - lf).mean() for lf, _ in fake) / len(fake)


def feature_matching_loss(real: list, fake: list) -> torch.Tensor:
    """L1 between discriminator features of real and generated audio, relative to the real features' scale."""
    loss, n = 0.0, 0
    for (_, fr), (_, ff) in zip(real, fake):
        for a, b in zip(fr, ff):
            loss = loss + F.l1_loss(b, a.detach()) / (a.detach().abs().mean() + 1e-5)
            n += 1
    return loss / n
