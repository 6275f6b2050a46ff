"""Face datasets: Parquet shard format, procedural synthetic faces, Ray Data training pipeline."""
