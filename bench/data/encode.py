"""Tokenisation and data loaders. Same rows, same order for every method: the train subset is drawn
with a fixed generator (seed 0) so all seeds see the same data, and the shuffle order follows `seed`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

SUBSET_SEED = 0  # fixed: the same train/dev subset for every method and seed


def subset(df: pd.DataFrame, n: int | None) -> pd.DataFrame:
    """A fixed random subset of n rows (all rows when n is None or larger than the data)."""
    if n is None or n >= len(df):
        return df
    idx = np.random.default_rng(SUBSET_SEED).permutation(len(df))[:n]
    return df.iloc[np.sort(idx)].reset_index(drop=True)


def tokenize(df: pd.DataFrame, tokenizer, max_seq_len: int) -> list[dict]:
    text_b = None if df["text_b"].isna().all() else df["text_b"].tolist()
    enc = tokenizer(df["text_a"].tolist(), text_b, truncation=True, max_length=max_seq_len)
    labels = df["label"].tolist()
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(df))]


def make_loader(features: list[dict], tokenizer, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(features, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=DataCollatorWithPadding(tokenizer, return_tensors="pt"))
