"""Exports to disk, resumable: the driver, its work folder, and one writer per format.

    _driver.py   `export_job`: a job to numpy, images, zip or parquet, resumable
    _state.py    the export's work folder: state file, lock, committed parts
    _writers.py  what every format shares: `Piece`, `FormatWriter`, PNG encoding
    _files.py    the numpy, images and zip formats
    _parquet.py  the parquet format (Hugging Face `datasets` reads it as an Image feature)
    _part.py     `write_part`: one chunk's part, written by another process (a Ray task)
    _images.py   `export_images`: a segmentation dataset to PNG folders (ARTeFACT-style)

Public names are re-exported by `pixcrawler_engine`.
"""
