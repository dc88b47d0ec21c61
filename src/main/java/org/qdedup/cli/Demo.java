package org.qdedup.cli;

import java.io.IOException;
import java.io.PrintStream;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Comparator;
import java.util.Random;
import java.util.stream.Stream;

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
            out.println("== sample disk: " + raw + " (" + Sizes.human(size) + ", 4 copies of one 4 MiB file, random data, holes)");
            step(out, "info", raw.toString());
            step(out, "map", raw.toString());
            Path copy = dir.resolve("copy.raw");
            long t0 = System.nanoTime();
            step(out, "convert", "-O", "raw", raw.toString(), copy.toString());
            out.printf("   converted in %.3f s%n", (System.nanoTime() - t0) / 1e9);
            step(out, "compare", raw.toString(), copy.toString());
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
        if (rc != 0) {
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
