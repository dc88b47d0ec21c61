package org.qdedup.io;

import java.nio.file.Path;

/** What the files held in memory (tests) share: an optional place, so companion files can be kept beside them. */
abstract class InMemoryFile implements BlockFile {
    private volatile Path location;

    /** Gives this file a place, so that companion files (the dedup index) are kept beside it. */
    public void placeAt(Path where) {
        location = where;
    }

    @Override
    public Path location() {
        return location;
    }

    /** Only the size: a file in memory has no inode or times. */
    @Override
    public FileStamp stamp() {
        return location == null ? null : new FileStamp(size(), 0, 0, 0);
    }

    @Override
    public abstract long size();
}
