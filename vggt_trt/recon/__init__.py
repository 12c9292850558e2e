"""Reconstruction: geometry, image preprocessing, rig folders, point-cloud files, voxel map."""
