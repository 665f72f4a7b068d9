"""Input data: annotation files -> MindRecord (conversion), record -> network input (transforms), and the
MindSpore pipeline that reads the records back (pipeline).

    records      the MindRecord row layout, shared by the writer and the readers
    annotations  COCO JSON / "other" TXT -> one ImageTask per image; skip reasons
    conversion   ImageTasks -> sharded MindRecord with a manifest; reuse, rebuild, stale partial output
    transforms   augmentation and normalisation of one sample (train and eval)
    pipeline     create_maskrcnn_dataset: order, sharding, batching

`src.dataset` re-exports the public names for code written against the ModelZoo layout.
"""
