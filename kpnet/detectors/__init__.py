"""Detector families on one interface (`base.Detector`): each module holds a family's network, its
decode settings and its encode / loss / decode / postprocess; `corner` holds what the corner families share."""
