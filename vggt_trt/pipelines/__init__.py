"""End-to-end pipelines: conversion, images to point cloud, live rigs, Depth Anything."""
