package org.qdedup.image;

import java.util.LinkedHashMap;
import java.util.Map;

/** LRU cache of decoded L2 tables by host offset (entries as longs; extended tables interleave entry and bitmap). */
final class L2Cache {
    private final int capacity;
    private final LinkedHashMap<Long, long[]> tables;

    L2Cache(int capacity) {
        this.capacity = Math.max(4, capacity);
        this.tables = new LinkedHashMap<>(16, 0.75f, true) {
            @Override
            protected boolean removeEldestEntry(Map.Entry<Long, long[]> eldest) {
                return size() > L2Cache.this.capacity;
            }
        };
    }

    synchronized long[] get(long offset) {
        return tables.get(offset);
    }

    synchronized void put(long offset, long[] table) {
        tables.put(offset, table);
    }

    synchronized void clear() {
        tables.clear();
    }
}
