"""The papers' analyses beyond AP: false-discovery comparisons and collision statistics."""
