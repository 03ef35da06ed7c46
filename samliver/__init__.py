"""samliver: liver and liver-tumour CT segmentation with the Segment Anything Model."""

__version__ = "0.1.0"
