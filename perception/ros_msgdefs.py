"""ROS 2 message definitions for camera images, as mcap-ros2 writers register them.

One copy for the drive recorder (perception.synthetic) and the stream readers' tests (deploy):
the concatenated ros2msg text with its dependencies, the form rosbag2 and MCAP store.
"""

from __future__ import annotations

_HEADER_DEFS = """================================================================================
MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
================================================================================
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec
"""

COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
IMAGE = "sensor_msgs/msg/Image"

#: ros2msg text (with dependencies) to register with ``mcap_ros2.writer.Writer.register_msgdef``.
COMPRESSED_IMAGE_MSGDEF = "std_msgs/Header header\nstring format\nuint8[] data\n" + _HEADER_DEFS
IMAGE_MSGDEF = (
    "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\n"
    "uint32 step\nuint8[] data\n" + _HEADER_DEFS
)
