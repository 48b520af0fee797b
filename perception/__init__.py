"""The autonomous-driving domain: detectors, data sets, training and COCO mAP."""
