"""`depmatch bench`: the encoder-swap benchmark (step time, throughput, memory, FLOPs, MFU, mIoU)."""
