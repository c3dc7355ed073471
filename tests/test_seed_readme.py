"""Every code block of the README this project started from, run as written.

Each test holds one block verbatim; where a block uses a name it never defines
(`input_tensor`, `plt`, `attention` in the later blocks), the test defines it
first, as a reader following the README top to bottom would have it."""

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402


def test_quick_start():
    import torch
    from sparse_attention import EnhancedSparseAttention

    # Initialize the module
    attention = EnhancedSparseAttention(
        in_channels=256,
        out_channels=256,
        num_heads=8,
        attention_ratio=0.5
    )

    # Process input
    x = torch.randn(4, 256, 32, 32)  # [batch_size, channels, height, width]
    output = attention(x)
    assert output.shape == (4, 256, 32, 32)


def _cnn_block():
    import torch.nn as nn
    from sparse_attention import EnhancedSparseAttention, SparsityPattern

    class CNNWithSparseAttention(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2)
            )

            self.attention = EnhancedSparseAttention(
                in_channels=64,
                out_channels=64,
                num_heads=8,
                attention_ratio=0.5,
                sparsity_pattern=SparsityPattern.AXIAL
            )

            self.classifier = nn.Sequential(
                nn.AdaptiveAvgPool2d((1, 1)),
                nn.Flatten(),
                nn.Linear(64, num_classes)
            )

        def forward(self, x):
            x = self.features(x)
            x = self.attention(x)
            return self.classifier(x)

    # Create model and process batch
    model = CNNWithSparseAttention()
    x = torch.randn(4, 3, 32, 32)
    output = model(x)
    return model, x, output


def test_basic_cnn_with_sparse_attention():
    model, x, output = _cnn_block()
    assert output.shape == (4, 10)


def test_different_sparsity_patterns():
    from sparse_attention import EnhancedSparseAttention, SparsityPattern

    # Block-sparse attention
    block_attention = EnhancedSparseAttention(
        in_channels=256,
        out_channels=256,
        sparsity_pattern=SparsityPattern.BLOCK,
        attention_ratio=0.5
    )

    # Axial attention
    axial_attention = EnhancedSparseAttention(
        in_channels=256,
        out_channels=256,
        sparsity_pattern=SparsityPattern.AXIAL,
        attention_ratio=0.5
    )

    # Longformer-style attention
    longformer_attention = EnhancedSparseAttention(
        in_channels=256,
        out_channels=256,
        sparsity_pattern=SparsityPattern.LONGFORMER,
        attention_ratio=0.5,
        kernel_size=7  # local attention window size
    )
    x = torch.randn(1, 256, 12, 12)
    for module in (block_attention, axial_attention, longformer_attention):
        assert module(x).shape == x.shape


def test_monitoring_and_visualization(capsys):
    model, x, _ = _cnn_block()
    input_tensor = model.features(x)
    import matplotlib.pyplot as plt

    # Monitor attention statistics
    def train_step(model, x):
        output = model(x)
        stats = model.attention.get_attention_stats()
        print(f"Mean attention: {stats.mean:.3f}")
        print(f"Sparsity: {stats.sparsity:.3f}")
        return output

    # Visualize attention patterns
    from sparse_attention.utils import visualize_attention_patterns
    fig = visualize_attention_patterns(model.attention, input_tensor)
    plt.show()

    train_step(model, x)
    printed = capsys.readouterr().out
    assert "Mean attention: 0.032" in printed and "Sparsity: 0.879" in printed  # 31 of 256 keys
    assert fig.axes


def test_cuda_kernel_switch():
    from sparse_attention import EnhancedSparseAttention

    # Enable/disable CUDA kernel
    attention = EnhancedSparseAttention(
        in_channels=256,
        out_channels=256,
        use_cuda_kernel=True  # Set to False to use PyTorch implementation
    )
    assert attention(torch.randn(1, 256, 6, 6)).shape == (1, 256, 6, 6)


def test_positional_encodings():
    from sparse_attention import EnhancedSparseAttention

    # Use relative positional encoding
    attention = EnhancedSparseAttention(
        in_channels=256,
        out_channels=256,
        use_relative_pos=True,
        max_relative_positions=32
    )

    # Use learnable positional encoding
    attention = EnhancedSparseAttention(
        in_channels=256,
        out_channels=256,
        use_learnable_pos=True
    )
    assert attention.pos_embedding is not None


def test_head_importance_analysis(capsys):
    from sparse_attention import EnhancedSparseAttention

    attention = EnhancedSparseAttention(in_channels=256, out_channels=256)
    with torch.no_grad():  # as after training: the gates differ
        attention.head_importance.copy_(torch.linspace(0.5, 1.5, 8))

    # Get head importance scores
    importance = attention.head_importance.detach()
    print(f"Head importance: {importance}")

    # Prune least important heads
    threshold = importance.mean()
    attention.head_importance.data *= (importance > threshold)

    assert "Head importance: tensor(" in capsys.readouterr().out
    assert attention.active_heads == [4, 5, 6, 7]
    assert attention(torch.randn(1, 256, 4, 4)).shape == (1, 256, 4, 4)
