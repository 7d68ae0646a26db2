"""Data files (JSON); a package only so that installs ship them."""
