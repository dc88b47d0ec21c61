package org.qdedup.image;

/**
 * How to open an image.
 *
 * @param format       "raw", "qcow2", or null to probe like qemu-img (qcow2 magic means qcow2, else raw)
 * @param forceShare   skip the image lock (qemu-img's -U)
 * @param snapshotName read this internal snapshot instead of the active layer, or null
 */
public record OpenOptions(String format, boolean forceShare, String snapshotName) {
    public static OpenOptions defaults() {
        return new OpenOptions(null, false, null);
    }

    public OpenOptions withFormat(String f) {
        return new OpenOptions(f, forceShare, snapshotName);
    }
}
