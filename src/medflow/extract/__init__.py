"""Raw images → shards: one extraction-job contract (`job`), WSI (`wsi`) and HSI (`hsi`) extraction, the index."""
