package org.qdedup.image;

import java.io.IOException;
import java.nio.file.Path;
import org.qdedup.dedup.DedupSidecar;
import org.qdedup.format.Header;
import org.qdedup.io.BlockFile;
import org.qdedup.io.FileStamp;

/** Whether the dedup index file beside an image may be trusted for the image as it is now. */
public final class DedupIndexFile {
    /**
     * @param contents the index file, when it is in sync with the image (else null)
     * @param problem  why it cannot be trusted (null when it can)
     * @param path     where the index file is (or would be), null for images without a place
     */
    public record Found(DedupSidecar.Contents contents, String problem, Path path) {
        public boolean inSync() {
            return contents != null;
        }

        /** The state as the JSON of check and stats names it: in-sync, absent (no index file), rebuilt. */
        public String state() {
            return contents != null ? "in-sync" : path == null || !java.nio.file.Files.exists(path) ? "absent" : "rebuilt";
        }
    }

    private DedupIndexFile() {
    }

    /** Call before anything writes to the image: the first write of a session makes the index file stale. */
    public static Found find(BlockFile file, Header h) {
        FileStamp stamp;
        try {
            stamp = h.dedupIndexInSync() ? file.stamp() : null;
        } catch (IOException e) {
            return new Found(null, "cannot stat the image: " + e.getMessage(), null);
        }
        return find(file.location(), h, stamp);
    }

    /**
     * The same for the image as it was when {@code h} and {@code stamp} were taken (before any write), reading the
     * index file only now.
     */
    public static Found find(Path loc, Header h, FileStamp stamp) {
        if (loc == null) {
            return new Found(null, "the image has no place for an index file", null);
        }
        Path path = DedupSidecar.pathFor(loc);
        if (!h.dedupIndexInSync()) {
            return new Found(null, h.dirty() ? "the image was not closed cleanly"
                    : "the image changed since the index file was written (in-sync bit clear)", path);
        }
        try {
            DedupSidecar.Contents c = DedupSidecar.read(path);
            if (c == null) {
                return new Found(null, "no index file " + path.getFileName(), path);
            }
            if (c.generation() != h.dedupGeneration() || c.clusterBits() != h.clusterBits()) {
                return new Found(null, "the index file belongs to another state of the image (generation differs)", path);
            }
            if (!c.stamp().equals(stamp)) {
                return new Found(null, "the image file changed since the index file was written (size, inode or times)", path);
            }
            return new Found(c, null, path);
        } catch (IOException e) {
            return new Found(null, "the index file is unusable: " + e.getMessage(), path);
        }
    }
}
