"""cafi: Combined Advantages of FIQA & IQA -- face-crop scoring as a Ray Data job."""

from cafi.redact import install_log_filter as _install_log_filter

__version__ = "0.1.0"

_install_log_filter()  # log lines never show a URI's userinfo or query (cafi/redact.py)
