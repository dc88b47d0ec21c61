package org.qdedup.image;

import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Set;

/**
 * LRU cache of decoded L2 tables by host offset (entries as longs; extended tables interleave entry and bitmap).
 * Tables changed by a writer are dirty: never evicted until the writer has written them back.
 */
final class L2Cache {
    private final int capacity;
    private final LinkedHashMap<Long, long[]> tables;
    private final Set<Long> dirty = new HashSet<>();

    L2Cache(int capacity) {
        this.capacity = Math.max(4, capacity);
        this.tables = new LinkedHashMap<>(16, 0.75f, true) {
            @Override
            protected boolean removeEldestEntry(Map.Entry<Long, long[]> eldest) {
                return size() > L2Cache.this.capacity && !dirty.contains(eldest.getKey());
            }
        };
    }

    synchronized long[] get(long offset) {
        return tables.get(offset);
    }

    synchronized void put(long offset, long[] table) {
        tables.put(offset, table);
    }

    synchronized void markDirty(long offset) {
        dirty.add(offset);
    }

    synchronized int dirtyCount() {
        return dirty.size();
    }

    /** The dirty tables (offset, entries), and forgets that they were dirty. */
    synchronized Map<Long, long[]> takeDirty() {
        Map<Long, long[]> out = new LinkedHashMap<>();
        for (Long off : dirty) {
            out.put(off, tables.get(off));
        }
        dirty.clear();
        return out;
    }

    synchronized void remove(long offset) {
        tables.remove(offset);
        dirty.remove(offset);
    }

    int capacity() {
        return capacity;
    }

}
