"""Task heads on the LLM: READ's <SEG> segmentation (SasP points into SAM)."""
