"""Input side: manifests, the dataset catalog, clip decoding, mixing plans and Ray Data pipelines."""
