"""Decoding one encoded image or mask into uint8 pixels, in bounded memory.

    _formats.py  the formats the decoder reads and their extensions (imports nothing)
    _headers.py  what an encoded image says about itself before any pixel is decoded
    _orientation.py  which way is up: EXIF, raw-profile PNG text, XMP, as Pillow reads them
    _chatter.py  what decoders say (stderr lines, warnings), taken per sample
    _plan.py     the geometry of one decode: output shape and mode, crop box, DCT scale need
    _image.py    the decode path: budget, reduced-scale JPEG, libvips shrink, Pillow, resize
    _pixels.py   orientation, colour conversion to 8 bits, the budget check, Pillow's errors
    _mask.py     segmentation masks: class ids kept exactly, nearest-neighbour resize

Public names are re-exported by `pixcrawler_engine`.
"""
