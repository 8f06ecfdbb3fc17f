"""Detector families. Each module provides the network, encode (targets), loss and decode."""
