package org.qdedup.bench;

import java.nio.ByteBuffer;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;

/**
 * Times opening a dedup image for writing up to its first write (which loads the dedup index: from the index file
 * when it is in sync, else by scanning the image), then closing it (which writes the index file).
 *
 * <pre>java -cp target/qdedup.jar org.qdedup.bench.OpenIndex IMG</pre>
 */
public final class OpenIndex {
    private OpenIndex() {
    }

    public static void main(String[] args) throws Exception {
        long t0 = System.nanoTime();
        long t1, t2;
        try (Qcow2Image q = Images.openWritable(args[0], OpenOptions.defaults())) {
            t1 = System.nanoTime();
            ByteBuffer one = ByteBuffer.allocate((int) q.header().clusterSize());
            q.read(one, 0);
            one.flip();
            q.write(one, 0); // the same content again: loads the index, changes nothing
            t2 = System.nanoTime();
            System.out.printf("open %.3f s, index load (first write) %.3f s, %d entries, from: %s%n", (t1 - t0) / 1e9,
                    (t2 - t1) / 1e9, q.writer().dedupIndexEntries(), q.writer().dedupIndexSource());
        }
        System.out.printf("close (writes the index file) %.3f s%n", (System.nanoTime() - t2) / 1e9);
    }
}
