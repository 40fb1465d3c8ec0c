"""Datasets: token shards and deterministic mixtures with exact resume, tokenizers, text and image readers."""
