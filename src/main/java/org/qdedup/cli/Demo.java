package org.qdedup.cli;

import java.io.IOException;
import java.io.PrintStream;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Comparator;
import java.util.Random;
import java.util.stream.Stream;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;

/** The demo: makes sample data in a temporary directory and runs qdedup's commands on it. */
final class Demo {
    private Demo() {
    }

    static int run(PrintStream out) throws IOException {
        Path dir = Files.createTempDirectory("qdedup-demo");
        try {
            Path raw = dir.resolve("sample.raw");
            long size = 64L << 20;
            makeSample(raw, size);
            out.println("== sample disk: " + raw + " (" + Sizes.human(size) + ": 4 copies of one 4 MiB block, 8 MiB of random data, holes)");
            step(out, "map", raw.toString());
            Path img = dir.resolve("sample.qcow2");
            long t0 = System.nanoTime();
            step(out, "convert", "-O", "qcow2", "-o", "cluster_size=4k", raw.toString(), img.toString());
            out.printf("   converted in %.3f s%n", (System.nanoTime() - t0) / 1e9);
            step(out, "info", img.toString());
            step(out, "check", img.toString());
            step(out, "snapshot", "-c", "before-edit", img.toString());
            try (Qcow2Image q = Images.openWritable(img.toString(), OpenOptions.defaults())) {
                q.write(ByteBuffer.wrap("edited after the snapshot".getBytes(java.nio.charset.StandardCharsets.US_ASCII)), 4096 + 7);
                q.discard(40L << 20, 8L << 20);
            }
            out.println("   (wrote 25 bytes at 4103 and discarded 8 MiB through the library)");
            step(out, "snapshot", "-l", img.toString());
            step(out, "check", img.toString());
            step(out, "compare", raw.toString(), img.toString());
            Path before = dir.resolve("before-edit.raw");
            step(out, "convert", "-l", "snapshot.name=before-edit", img.toString(), before.toString());
            step(out, "compare", raw.toString(), before.toString());
            Path packed = dir.resolve("sample-zstd.qcow2");
            step(out, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw.toString(), packed.toString());
            out.println("== what would dedup save? (reads the disk, writes nothing)");
            step(out, "estimate", raw.toString());
            Path deduped = dir.resolve("sample-dedup.qcow2");
            long t1 = System.nanoTime();
            step(out, "convert", "--dedup", "-O", "qcow2", raw.toString(), deduped.toString());
            double secs = (System.nanoTime() - t1) / 1e9;
            step(out, "compare", raw.toString(), deduped.toString());
            long plainSize = Files.size(dir.resolve("sample.qcow2"));
            long dedupSize = Files.size(deduped);
            out.printf("   host file: %s plain qcow2, %s zstd-compressed, %s deduped in %.2f s "
                    + "(the 4 copies stored once): dedup saved %d bytes, ratio %.2f%n", Sizes.human(plainSize),
                    Sizes.human(Files.size(packed)), Sizes.human(dedupSize), secs, plainSize - dedupSize,
                    (double) plainSize / dedupSize);
            out.println("== dedup in place of an existing image (a plain qcow2 copy, as qemu-img would make it)");
            Path inPlace = dir.resolve("sample-in-place.qcow2");
            step(out, "convert", "-O", "qcow2", "-o", "cluster_size=4k", raw.toString(), inPlace.toString());
            long t2 = System.nanoTime();
            step(out, "dedup", inPlace.toString());
            out.printf("   deduped in place in %.2f s%n", (System.nanoTime() - t2) / 1e9);
            step(out, "stats", inPlace.toString());
            step(out, "check", inPlace.toString());
            return 0;
        } finally {
            try (Stream<Path> s = Files.walk(dir)) {
                s.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
            }
        }
    }

    private static void step(PrintStream out, String... args) {
        out.println("$ qdedup " + String.join(" ", args));
        int rc = Main.run(args, out, Context.err());
        boolean compareDiffers = args[0].equals("compare") && rc == 1;
        if (rc != 0 && !compareDiffers) {
            throw new CliException("demo step failed: qdedup " + String.join(" ", args) + " (exit " + rc + ")");
        }
    }

    /** Four copies of one 4 MiB block of random data, 8 MiB of fresh random data, the rest a hole. */
    static void makeSample(Path raw, long size) throws IOException {
        Random r = new Random(42);
        byte[] block = new byte[4 << 20];
        r.nextBytes(block);
        byte[] other = new byte[8 << 20];
        r.nextBytes(other);
        try (var ch = java.nio.channels.FileChannel.open(raw, java.nio.file.StandardOpenOption.CREATE,
                java.nio.file.StandardOpenOption.WRITE, java.nio.file.StandardOpenOption.TRUNCATE_EXISTING)) {
            for (int i = 0; i < 4; i++) {
                ch.write(ByteBuffer.wrap(block), (long) i * (8 << 20));
            }
            ch.write(ByteBuffer.wrap(other), 40L << 20);
            ch.truncate(size);
            if (ch.size() < size) {
                ch.write(ByteBuffer.allocate(1), size - 1);
            }
        }
    }
}
