"""cafi: Combined Advantages of FIQA & IQA -- face-crop scoring as a Ray Data job."""

__version__ = "0.1.0"
