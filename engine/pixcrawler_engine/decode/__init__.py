"""Decoding one encoded image or mask into uint8 pixels, in bounded memory.

    _headers.py  what an encoded image says about itself before any pixel is decoded
    _plan.py     the geometry of one decode: output shape and mode, crop box, DCT scale need
    _image.py    the decode path: budget, reduced-scale JPEG, libvips shrink, Pillow, resize
    _pixels.py   orientation, colour conversion to 8 bits, the budget check, Pillow's errors
    _mask.py     segmentation masks: class ids kept exactly, nearest-neighbour resize

Public names are re-exported by `pixcrawler_engine`.
"""
