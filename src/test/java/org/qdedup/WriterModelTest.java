package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import java.util.stream.Stream;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.Arguments;
import org.junit.jupiter.params.provider.MethodSource;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.CreateOptions;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Create;
import org.qdedup.image.Qcow2Image;

/**
 * Model-based random test of the writer: random unaligned writes, write-zeroes and discards against an in-memory
 * model, reads checked against it, qemu-img check at intervals, and QEMU reading (and writing) the result.
 */
class WriterModelTest {
    static final long SEED = Long.getLong("qdedup.seed", 20261125L);

    @TempDir
    Path dir;

    static Stream<Arguments> configs() {
        List<Arguments> out = new ArrayList<>();
        for (int bits : new int[]{9, 12, 16, 21}) {
            for (int order : new int[]{1, 4, 6}) {
                for (boolean backing : new boolean[]{false, true}) {
                    out.add(Arguments.of(bits, order, 3, backing));
                }
            }
            for (boolean backing : new boolean[]{false, true}) {
                out.add(Arguments.of(bits, 4, 2, backing));
            }
        }
        return out.stream();
    }

    @ParameterizedTest(name = "cluster_bits={0} refcount_order={1} v{2} backing={3}")
    @MethodSource("configs")
    void randomWorkloadMatchesModelAndQemu(int bits, int order, int version, boolean backing) throws Exception {
        long cs = 1L << bits;
        long size = bits == 21 ? 40L << 20 : Math.max(4L << 20, 64 * cs);
        int ops = bits == 21 ? 150 : 1200;
        Random r = new Random(SEED ^ (bits * 31L + order * 7L + version * 3L + (backing ? 1 : 0)));
        byte[] model = new byte[(int) size];
        String img = dir.resolve("t.qcow2").toString();
        CreateOptions o = CreateOptions.defaults(size).withClusterBits(bits).withRefcountOrder(order).withVersion(version);
        if (backing) {
            long bsize = size * 3 / 4 + 512;
            Qemu.img(dir, "create", "-f", "qcow2", "-o", "cluster_size=65536", "base.qcow2", Long.toString(bsize));
            Qemu.io(dir, "qcow2", "base.qcow2", List.of("write -P 0x5a 0 " + (bsize / 2 & ~511L),
                    "write -P 0x33 " + (bsize / 2 & ~511L) + " 1M"));
            try (BlockDevice b = Images.open(dir.resolve("base.qcow2").toString(), OpenOptions.defaults())) {
                ByteBuffer bb = ByteBuffer.wrap(model, 0, (int) b.size());
                b.read(bb, 0);
            }
            o = o.withBacking("base.qcow2", "qcow2");
        }
        Qcow2Create.create(img, o);
        boolean snapshotTaken = false;
        long l2Allocated = 0, l2Copied = 0, sharedCopied = 0;
        Qcow2Image q = Images.openWritable(img, OpenOptions.defaults());
        try {
            for (int i = 0; i < ops; i++) {
                int kind = r.nextInt(10);
                long off = randomOffset(r, size, cs);
                long len = Math.min(size - off, randomLength(r, cs));
                if (kind < 6) {
                    byte[] data = new byte[(int) len];
                    r.nextBytes(data);
                    if (r.nextInt(4) == 0) {
                        java.util.Arrays.fill(data, (byte) r.nextInt(256));
                    }
                    q.write(ByteBuffer.wrap(data), off);
                    System.arraycopy(data, 0, model, (int) off, (int) len);
                } else if (kind < 8) {
                    q.writeZeroes(off, len, r.nextBoolean());
                    java.util.Arrays.fill(model, (int) off, (int) (off + len), (byte) 0);
                } else if (kind < 9) {
                    q.discard(off, len);
                    java.util.Arrays.fill(model, (int) off, (int) (off + len), (byte) 0);
                } else {
                    q.flush();
                }
                if (i % 25 == 0) {
                    long ro = randomOffset(r, size, cs);
                    long rl = Math.min(size - ro, randomLength(r, cs) * 2);
                    assertRange(q, model, ro, rl);
                }
                if (i > 0 && i % 300 == 0) {
                    q.flush();
                    assertClean(img, true);
                }
                if (!snapshotTaken && i == ops / 2 && order >= 1) {
                    // Shared clusters: QEMU takes a snapshot, we copy-on-write from then on.
                    l2Allocated += q.writer().stats().l2TablesAllocated;
                    q.close();
                    Qemu.img(dir, "snapshot", "-c", "s1", img);
                    Files.write(dir.resolve("snap.raw"), model);
                    q = Images.openWritable(img, OpenOptions.defaults());
                    snapshotTaken = true;
                }
            }
            assertRange(q, model, 0, size);
            l2Allocated += q.writer().stats().l2TablesAllocated;
            l2Copied += q.writer().stats().l2TablesCopied;
            sharedCopied += q.writer().stats().sharedClustersCopied;
        } finally {
            q.close();
        }
        assertThat(l2Allocated).as("L2 tables allocated").isPositive();
        if (snapshotTaken) {
            assertThat(l2Copied).as("L2 tables shared with the snapshot copied").isPositive();
            assertThat(sharedCopied).as("shared data clusters copied on write").isPositive();
        }
        assertClean(img, false);
        Path raw = dir.resolve("model.raw");
        Files.write(raw, model);
        assertThat(Qemu.imgRaw(dir, "compare", "-f", "qcow2", "-F", "raw", img, raw.toString()).exit())
                .as("qemu-img compare with the model").isZero();
        if (snapshotTaken) {
            Qemu.img(dir, "convert", "-O", "raw", "-l", "snapshot.name=s1", img, "snapout.raw");
            assertThat(Files.mismatch(dir.resolve("snapout.raw"), dir.resolve("snap.raw"))).as("snapshot content").isEqualTo(-1);
        }
        // QEMU writes into our image, and we read its writes right.
        long qoff = (size / 3) & ~511L;
        Qemu.io(dir, "qcow2", img, List.of("write -P 0x77 " + qoff + " 12800", "write -z " + (qoff + 65536) + " 4096"));
        java.util.Arrays.fill(model, (int) qoff, (int) qoff + 12800, (byte) 0x77);
        java.util.Arrays.fill(model, (int) qoff + 65536, (int) qoff + 65536 + 4096, (byte) 0);
        try (BlockDevice d = Images.open(img, OpenOptions.defaults())) {
            assertRange(d, model, 0, size);
        }
        assertClean(img, false);
    }

    static long randomOffset(Random r, long size, long cs) {
        long off = switch (r.nextInt(3)) {
            case 0 -> (long) (r.nextDouble() * size) & -cs;
            case 1 -> (long) (r.nextDouble() * size) & ~511L;
            default -> (long) (r.nextDouble() * size);
        };
        return Math.min(off, size - 1);
    }

    static long randomLength(Random r, long cs) {
        return switch (r.nextInt(4)) {
            case 0 -> 1 + r.nextInt(700);
            case 1 -> cs;
            case 2 -> cs * (1 + r.nextInt(3));
            default -> 1 + r.nextInt((int) Math.min(3 * cs + 1000, 1 << 20));
        };
    }

    static void assertRange(BlockDevice d, byte[] model, long off, long len) throws IOException {
        ByteBuffer got = ByteBuffer.allocate((int) len);
        d.read(got, off);
        int m = ByteBuffer.wrap(model, (int) off, (int) len).mismatch(got.flip());
        assertThat(m).as("first mismatch reading %d bytes at %d (absolute offset %d)", len, off, off + m).isEqualTo(-1);
    }

    void assertClean(String img, boolean forceShare) {
        Qemu.Result res = forceShare ? Qemu.imgRaw(dir, "check", "-U", img) : Qemu.imgRaw(dir, "check", img);
        assertThat(res.exit()).as("qemu-img check %s:%n%s%s", img, res.out(), res.err()).isZero();
    }

    @Test
    void refcountTableGrowsAndL2TablesAreAllocated() throws Exception {
        // 512-byte clusters with 64-bit refcounts: one refcount table cluster covers only 2 MiB of file.
        String img = dir.resolve("g.qcow2").toString();
        long size = 16L << 20;
        Qcow2Create.create(img, CreateOptions.defaults(size).withClusterBits(9).withRefcountOrder(6));
        long before;
        try (BlockDevice d = Images.open(img, OpenOptions.defaults())) {
            before = ((Qcow2Image) d).header().refcountTableOffset();
        }
        byte[] data = new byte[(int) size];
        new Random(1).nextBytes(data);
        try (Qcow2Image q = Images.openWritable(img, OpenOptions.defaults())) {
            for (long off = 0; off < size; off += 1 << 20) {
                q.write(ByteBuffer.wrap(data, (int) off, 1 << 20), off);
            }
        }
        try (BlockDevice d = Images.open(img, OpenOptions.defaults())) {
            Qcow2Image q = (Qcow2Image) d;
            assertThat(q.header().refcountTableOffset()).as("refcount table moved").isNotEqualTo(before);
            assertThat(q.header().refcountTableClusters()).isGreaterThan(1);
            assertRange(d, data, 0, size);
        }
        assertClean(img, false);
        Path raw = dir.resolve("g.raw");
        Files.write(raw, data);
        assertThat(Qemu.imgRaw(dir, "compare", img, raw.toString()).exit()).isZero();
    }
}
