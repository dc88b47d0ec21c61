package org.qdedup.format;

/** What a guest (sub)cluster maps to, as QEMU classifies it (QCow2SubclusterType). */
public enum SubclusterType {
    /** Data stored at a host offset. */
    NORMAL,
    /** A compressed cluster: descriptor with host byte offset and sector count. */
    COMPRESSED,
    /** Reads as zeros; no host cluster. */
    ZERO_PLAIN,
    /** Reads as zeros; a host cluster stays allocated. */
    ZERO_ALLOC,
    /** Not here: falls through to the backing file, else zeros. */
    UNALLOCATED_PLAIN,
    /** Extended L2 only: host cluster allocated but this subcluster falls through. */
    UNALLOCATED_ALLOC,
    /** Contradictory bits. */
    INVALID
}
