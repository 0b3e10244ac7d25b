"""Tokenisation and data loaders. Same rows, same order for every method: the train subset is drawn
with a fixed generator (seed 0) so all seeds see the same data, and the shuffle order follows `seed`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

SUBSET_SEED = 0  # fixed: the same train/dev subset for every method and seed
VALIDATION_SEED = 1  # fixed: the same validation rows for every method, seed and budget (any validation_rows)


def subset(df: pd.DataFrame, n: int | None) -> pd.DataFrame:
    """A fixed random subset of n rows (all rows when n is None or larger than the data)."""
    if n is None or n >= len(df):
        return df
    idx = np.random.default_rng(SUBSET_SEED).permutation(len(df))[:n]
    return df.iloc[np.sort(idx)].reset_index(drop=True)


def carve_validation(train: pd.DataFrame, dev: pd.DataFrame, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train without the validation rows, validation): n rows drawn from train by a fixed permutation (the first n of
    it, so a smaller n is a subset of a larger one), never a row whose text is also in dev; every training row whose
    text is a validation row's is left out of train, so no text is in two splits. Rows keep their file order."""
    def texts(df: pd.DataFrame) -> pd.Series:
        return df["text_a"].astype(str) + "\t" + df["text_b"].fillna("").astype(str)

    train_text, dev_text = texts(train), set(texts(dev))
    candidates = np.flatnonzero(~train_text.isin(dev_text).to_numpy())
    order = candidates[np.random.default_rng(VALIDATION_SEED).permutation(len(candidates))]
    chosen = np.sort(order[:n])
    validation = train.iloc[chosen]
    rest = ~train_text.isin(set(train_text.iloc[chosen])).to_numpy()
    return train[rest].reset_index(drop=True), validation.reset_index(drop=True)


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
