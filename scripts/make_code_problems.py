"""Regenerate vhack/data/code_problems.jsonl: the coding problems of `vhack.grpo.envs.code`.

Every problem here was written for this project (Apache-2.0, like the package). Each has a spec, a
`class Solution` reference, one visible example and hidden tests whose expected outputs are
computed by running the reference. Run: python scripts/make_code_problems.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "vhack" / "data" / "code_problems.jsonl"

R = random.Random(20261202)


def words(n: int, alphabet: str = "abcdefghij") -> str:
    return " ".join("".join(R.choice(alphabet) for _ in range(R.randint(1, 7))) for _ in range(n))


def ints(n: int, lo: int = -20, hi: int = 20) -> list[int]:
    return [R.randint(lo, hi) for _ in range(n)]


def text(n: int, alphabet: str = "abcdeiouxyz AEI,") -> str:
    return "".join(R.choice(alphabet) for _ in range(n))


# (method, signature, description, reference body, visible example args, hidden args)
PROBLEMS = [
    (
        "reverseVowels",
        "def reverseVowels(self, s: str) -> str",
        "Reverse only the vowels (a, e, i, o, u, in either case) of the string `s`; every other "
        "character stays where it is.",
        """
        vowels = set("aeiouAEIOU")
        chars = list(s)
        idx = [i for i, c in enumerate(chars) if c in vowels]
        for i, j in zip(idx, reversed(idx)):
            chars[i] = s[j]
        return "".join(chars)
        """,
        ["education"],
        [["hello"], [""], ["xyz"], ["AbcE"], ["aA"], ["programming language"]]
        + [[text(R.randint(0, 15))] for _ in range(6)],
    ),
    (
        "countVowels",
        "def countVowels(self, s: str) -> int",
        "Return how many characters of `s` are vowels (a, e, i, o, u, in either case).",
        "return sum(1 for c in s if c in 'aeiouAEIOU')",
        ["Programming Is Fun"],
        [[""], ["bcd"], ["AEIOU"], ["queue"]] + [[text(R.randint(0, 20))] for _ in range(8)],
    ),
    (
        "isAnagram",
        "def isAnagram(self, s: str, t: str) -> bool",
        "Return whether `t` uses exactly the same letters as `s`, each the same number of times.",
        "return sorted(s) == sorted(t)",
        ["listen", "silent"],
        [["rat", "car"], ["", ""], ["a", "aa"], ["abc", "cba"], ["aab", "abb"]]
        + [[w, "".join(R.sample(w, len(w)))] for w in (words(1) for _ in range(4))]
        + [[words(1), words(1)] for _ in range(3)],
    ),
    (
        "runLengthEncode",
        "def runLengthEncode(self, s: str) -> str",
        "Encode `s` by replacing each maximal run of a repeated character with the character "
        'followed by the run length, e.g. "aab" -> "a2b1".',
        """
        out = []
        i = 0
        while i < len(s):
            j = i
            while j < len(s) and s[j] == s[i]:
                j += 1
            out.append(s[i] + str(j - i))
            i = j
        return "".join(out)
        """,
        ["wwwwaaadexxxxxx"],
        [[""], ["a"], ["abc"], ["zzzzzzzzzzzz"]]
        + [["".join(R.choice("ab") * R.randint(1, 4) for _ in range(5))] for _ in range(8)],
    ),
    (
        "secondLargest",
        "def secondLargest(self, nums: list[int]) -> int",
        "Return the second largest distinct value in `nums` (it has at least two distinct values).",
        "return sorted(set(nums))[-2]",
        [[4, 9, 1, 9, 7]],
        [[[1, 2]], [[5, 5, 3]], [[-1, -7, -3]], [[2, 1, 2, 1]]]
        + [[list(dict.fromkeys(ints(8)))] for _ in range(8)],
    ),
    (
        "rotateRight",
        "def rotateRight(self, nums: list[int], k: int) -> list[int]",
        "Return `nums` rotated right by `k` steps (k >= 0; k may exceed the length). An empty list "
        "stays empty.",
        """
        if not nums:
            return []
        k %= len(nums)
        return nums[len(nums) - k:] + nums[:len(nums) - k]
        """,
        [[10, 20, 30, 40, 50], 2],
        [[[], 3], [[1], 5], [[1, 2, 3], 0], [[1, 2, 3], 3], [[1, 2, 3], 4]]
        + [[ints(R.randint(1, 9)), R.randint(0, 12)] for _ in range(7)],
    ),
    (
        "digitSum",
        "def digitSum(self, n: int) -> int",
        "Return the sum of the decimal digits of the non-negative integer `n`.",
        "return sum(int(d) for d in str(n))",
        [98765],
        [[0], [7], [10], [999999], [1000001]] + [[R.randint(0, 10**12)] for _ in range(7)],
    ),
    (
        "fizzBuzz",
        "def fizzBuzz(self, n: int) -> list[str]",
        'Return the strings for 1..n: "FizzBuzz" for multiples of 15, "Fizz" for other multiples '
        'of 3, "Buzz" for other multiples of 5, and the number itself otherwise.',
        """
        out = []
        for i in range(1, n + 1):
            if i % 15 == 0:
                out.append("FizzBuzz")
            elif i % 3 == 0:
                out.append("Fizz")
            elif i % 5 == 0:
                out.append("Buzz")
            else:
                out.append(str(i))
        return out
        """,
        [7],
        [[0], [1], [3], [5], [15], [16], [31]],
    ),
    (
        "capitalizeWords",
        "def capitalizeWords(self, s: str) -> str",
        "Words of `s` are separated by single spaces. Return `s` with the first letter of every "
        "word in upper case and the rest of each word in lower case.",
        'return " ".join(w[:1].upper() + w[1:].lower() for w in s.split(" "))',
        ["the qUICK brown fox"],
        [[""], ["a"], ["HELLO WORLD"], ["x y z"]]
        + [[words(R.randint(1, 5), "abcDEFghI")] for _ in range(8)],
    ),
    (
        "removeDuplicates",
        "def removeDuplicates(self, nums: list[int]) -> list[int]",
        "Return the values of `nums` without repeats, each kept at its first occurrence, in order.",
        "return list(dict.fromkeys(nums))",
        [[3, 1, 3, 2, 1, 5]],
        [[[]], [[1, 1, 1]], [[1, 2, 3]], [[-1, 0, -1, 0]]]
        + [[ints(R.randint(0, 12), -4, 4)] for _ in range(8)],
    ),
    (
        "countWords",
        "def countWords(self, s: str) -> int",
        "Return the number of words in `s`; words are separated by one or more whitespace "
        "characters (spaces, tabs, newlines).",
        "return len(s.split())",
        ["  one two\tthree  "],
        [[""], ["   "], ["word"], ["a\nb\nc"], ["x  y"]]
        + [[text(R.randint(0, 20), "ab  \t")] for _ in range(7)],
    ),
    (
        "maxProfit",
        "def maxProfit(self, prices: list[int]) -> int",
        "`prices[i]` is a stock's price on day i. Return the largest profit from buying on one day "
        "and selling on a later day, or 0 if no trade makes a profit.",
        """
        best, low = 0, None
        for p in prices:
            if low is None or p < low:
                low = p
            best = max(best, p - low)
        return best
        """,
        [[7, 1, 5, 3, 6, 4]],
        [[[]], [[5]], [[5, 4, 3]], [[1, 2]], [[3, 3, 3]]]
        + [[ints(R.randint(2, 10), 1, 30)] for _ in range(7)],
    ),
    (
        "missingNumber",
        "def missingNumber(self, nums: list[int]) -> int",
        "`nums` holds n distinct numbers taken from 0..n, in any order. Return the one missing.",
        "return len(nums) * (len(nums) + 1) // 2 - sum(nums)",
        [[3, 0, 1, 4, 6, 2]],
        [[[]], [[0]], [[1]], [[1, 2]], [[2, 0]]]
        + [
            [[x for x in R.sample(range(n + 1), n + 1) if x != m]]
            for n, m in ((R.randint(2, 12), None) for _ in range(7))
            for m in [R.randint(0, n)]
        ],
    ),
    (
        "isPowerOfTwo",
        "def isPowerOfTwo(self, n: int) -> bool",
        "Return whether the integer `n` is a power of two (1, 2, 4, 8, ...).",
        "return n > 0 and n & (n - 1) == 0",
        [64],
        [[0], [1], [2], [3], [-8], [1024], [1023], [6], [2**40], [2**40 + 2]],
    ),
    (
        "gcd",
        "def gcd(self, a: int, b: int) -> int",
        "Return the greatest common divisor of the non-negative integers `a` and `b` (not both "
        "zero).",
        """
        while b:
            a, b = b, a % b
        return a
        """,
        [84, 36],
        [[0, 5], [5, 0], [7, 13], [12, 12], [1, 99]]
        + [[R.randint(1, 10**6), R.randint(1, 10**6)] for _ in range(7)],
    ),
    (
        "toBinary",
        "def toBinary(self, n: int) -> str",
        'Return the binary representation of the non-negative integer `n`, without a "0b" prefix '
        'or leading zeros ("0" for zero).',
        "return format(n, 'b')",
        [37],
        [[0], [1], [2], [255], [256]] + [[R.randint(0, 10**9)] for _ in range(7)],
    ),
    (
        "moveZeroes",
        "def moveZeroes(self, nums: list[int]) -> list[int]",
        "Return `nums` with every 0 moved to the end, the other values keeping their order.",
        "return [x for x in nums if x != 0] + [0] * nums.count(0)",
        [[0, 4, 0, 3, 12]],
        [[[]], [[0]], [[1]], [[0, 0, 1]], [[1, 0, 0]]]
        + [[ints(R.randint(1, 10), -2, 3)] for _ in range(7)],
    ),
    (
        "longestWord",
        "def longestWord(self, s: str) -> str",
        "Words of `s` are separated by single spaces. Return its longest word; on a tie, the first "
        "one. An empty string gives an empty string.",
        """
        best = ""
        for w in s.split(" "):
            if len(w) > len(best):
                best = w
        return best
        """,
        ["we hold these truths"],
        [[""], ["a"], ["ab cd"], ["a bb ccc dd"]] + [[words(R.randint(1, 6))] for _ in range(8)],
    ),
    (
        "charFrequency",
        "def charFrequency(self, s: str) -> dict[str, int]",
        "Return a dict mapping each character of `s` to the number of times it occurs.",
        """
        counts = {}
        for c in s:
            counts[c] = counts.get(c, 0) + 1
        return counts
        """,
        ["banana"],
        [[""], ["a"], ["abcabc"], ["  "]] + [[text(R.randint(1, 12), "abc d")] for _ in range(8)],
    ),
    (
        "mergeSorted",
        "def mergeSorted(self, a: list[int], b: list[int]) -> list[int]",
        "`a` and `b` are sorted in ascending order. Return one ascending list of all their values.",
        """
        i = j = 0
        out = []
        while i < len(a) and j < len(b):
            if a[i] <= b[j]:
                out.append(a[i])
                i += 1
            else:
                out.append(b[j])
                j += 1
        return out + a[i:] + b[j:]
        """,
        [[1, 4, 9], [2, 3, 10, 11]],
        [[[], []], [[1], []], [[], [2]], [[1, 1], [1]]]
        + [[sorted(ints(R.randint(0, 6))), sorted(ints(R.randint(0, 6)))] for _ in range(8)],
    ),
    (
        "isSubsequence",
        "def isSubsequence(self, s: str, t: str) -> bool",
        "Return whether `s` can be obtained from `t` by deleting some characters (keeping order).",
        """
        it = iter(t)
        return all(c in it for c in s)
        """,
        ["ace", "abcde"],
        [["", ""], ["", "abc"], ["a", ""], ["aec", "abcde"], ["abc", "abc"], ["aa", "a"]]
        + [[text(R.randint(0, 3), "abc"), text(R.randint(0, 8), "abc")] for _ in range(6)],
    ),
    (
        "chunkList",
        "def chunkList(self, nums: list[int], size: int) -> list[list[int]]",
        "Split `nums` into consecutive chunks of length `size` (size >= 1); the last chunk may be "
        "shorter.",
        "return [nums[i:i + size] for i in range(0, len(nums), size)]",
        [[1, 2, 3, 4, 5, 6, 7], 3],
        [[[], 2], [[1], 1], [[1, 2], 5], [[1, 2, 3, 4], 2]]
        + [[ints(R.randint(0, 10)), R.randint(1, 4)] for _ in range(8)],
    ),
    (
        "titleToNumber",
        "def titleToNumber(self, title: str) -> int",
        "Spreadsheet columns are named A, B, ..., Z, AA, AB, ... Return the 1-based number of the "
        'column called `title` ("A" -> 1, "AA" -> 27).',
        """
        n = 0
        for c in title:
            n = n * 26 + ord(c) - ord("A") + 1
        return n
        """,
        ["ZY"],
        [["A"], ["Z"], ["AA"], ["AZ"], ["BA"], ["ZZZ"], ["FXSHRXW"]]
        + [["".join(R.choice("ABCXYZ") for _ in range(R.randint(1, 4)))] for _ in range(5)],
    ),
    (
        "numberToTitle",
        "def numberToTitle(self, n: int) -> str",
        "Spreadsheet columns are named A, B, ..., Z, AA, AB, ... Return the name of column number "
        '`n` (n >= 1; 1 -> "A", 28 -> "AB").',
        """
        out = []
        while n > 0:
            n, r = divmod(n - 1, 26)
            out.append(chr(ord("A") + r))
        return "".join(reversed(out))
        """,
        [701],
        [[1], [26], [27], [52], [53], [702], [703], [18278]]
        + [[R.randint(1, 10**6)] for _ in range(4)],
    ),
    (
        "primeFactors",
        "def primeFactors(self, n: int) -> list[int]",
        "Return the prime factors of `n` (n >= 2) in ascending order, each repeated as often as it "
        "divides n.",
        """
        out = []
        d = 2
        while d * d <= n:
            while n % d == 0:
                out.append(d)
                n //= d
            d += 1
        if n > 1:
            out.append(n)
        return out
        """,
        [360],
        [[2], [3], [4], [97], [1024], [999983], [600851475143]]
        + [[R.randint(2, 10**6)] for _ in range(5)],
    ),
    (
        "pascalRow",
        "def pascalRow(self, n: int) -> list[int]",
        "Return row `n` (0-based) of Pascal's triangle: the binomial coefficients C(n, 0) ... "
        "C(n, n).",
        """
        row = [1]
        for _ in range(n):
            row = [a + b for a, b in zip([0] + row, row + [0])]
        return row
        """,
        [5],
        [[0], [1], [2], [3], [10], [20], [33]],
    ),
    (
        "majorityElement",
        "def majorityElement(self, nums: list[int]) -> int",
        "Return the value that occurs more than len(nums) // 2 times in `nums` (one always does).",
        """
        counts = {}
        for x in nums:
            counts[x] = counts.get(x, 0) + 1
        return max(counts, key=counts.get)
        """,
        [[2, 2, 1, 1, 1, 2, 2]],
        [[[7]], [[3, 3, 4]], [[-1, -1, -1, 5]]]
        + [
            [R.sample([m] * (k + 1) + ints(k), 2 * k + 1)]
            for m, k in ((R.randint(-9, 9), R.randint(1, 5)) for _ in range(9))
        ],
    ),
    (
        "collapseSpaces",
        "def collapseSpaces(self, s: str) -> str",
        "Return `s` with leading and trailing spaces removed and every run of spaces inside it "
        "replaced by a single space.",
        'return " ".join(w for w in s.split(" ") if w)',
        ["  many   spaces here "],
        [[""], ["   "], ["a"], ["a b"], [" a  b "]]
        + [[text(R.randint(0, 16), "ab   ")] for _ in range(7)],
    ),
    (
        "caesarShift",
        "def caesarShift(self, s: str, k: int) -> str",
        "Shift every lowercase letter of `s` forward by `k` places in the alphabet, wrapping from "
        "z to a (k >= 0); other characters stay the same.",
        """
        return "".join(
            chr((ord(c) - 97 + k) % 26 + 97) if "a" <= c <= "z" else c for c in s
        )
        """,
        ["hello, world", 3],
        [["", 5], ["xyz", 3], ["abc", 26], ["ABC def", 1], ["z", 52]]
        + [[text(R.randint(0, 12), "abwxyz ,A"), R.randint(0, 60)] for _ in range(7)],
    ),
    (
        "sumOfMultiples",
        "def sumOfMultiples(self, n: int) -> int",
        "Return the sum of all positive integers below `n` that are divisible by 3 or by 5.",
        "return sum(i for i in range(1, n) if i % 3 == 0 or i % 5 == 0)",
        [20],
        [[0], [1], [4], [6], [16], [1000]] + [[R.randint(0, 5000)] for _ in range(6)],
    ),
    (
        "flattenOnce",
        "def flattenOnce(self, lists: list[list[int]]) -> list[int]",
        "Return the values of the inner lists of `lists`, concatenated in order.",
        "return [x for inner in lists for x in inner]",
        [[[1, 2], [], [3], [4, 5, 6]]],
        [[[]], [[[]]], [[[1]]], [[[], []]]]
        + [[[ints(R.randint(0, 3)) for _ in range(R.randint(0, 4))]] for _ in range(8)],
    ),
    (
        "runningSum",
        "def runningSum(self, nums: list[int]) -> list[int]",
        "Return the running sums of `nums`: element i is nums[0] + ... + nums[i].",
        """
        out, total = [], 0
        for x in nums:
            total += x
            out.append(total)
        return out
        """,
        [[3, 1, 4, 1, 5]],
        [[[]], [[0]], [[-1, 1]]] + [[ints(R.randint(1, 10))] for _ in range(9)],
    ),
    (
        "longestRun",
        "def longestRun(self, nums: list[int]) -> int",
        "Return the length of the longest stretch of equal adjacent values in `nums` (0 if empty).",
        """
        best = run = 0
        for i, x in enumerate(nums):
            run = run + 1 if i and nums[i - 1] == x else 1
            best = max(best, run)
        return best
        """,
        [[1, 1, 2, 2, 2, 3, 2]],
        [[[]], [[5]], [[1, 2, 3]], [[4, 4, 4, 4]]]
        + [[ints(R.randint(1, 12), 0, 2)] for _ in range(8)],
    ),
    (
        "isPalindromeNumber",
        "def isPalindromeNumber(self, n: int) -> bool",
        "Return whether the decimal digits of the integer `n` read the same backward (negative "
        "numbers are not palindromes).",
        "return n >= 0 and str(n) == str(n)[::-1]",
        [12321],
        [[0], [7], [10], [-121], [1221], [1231], [1000021], [9999]]
        + [[R.randint(0, 10**4)] for _ in range(4)],
    ),
    (
        "commonElements",
        "def commonElements(self, a: list[int], b: list[int]) -> list[int]",
        "Return the values that occur in both `a` and `b`, each once, in ascending order.",
        "return sorted(set(a) & set(b))",
        [[5, 1, 3, 3, 8], [3, 8, 8, 2]],
        [[[], []], [[1], []], [[1, 2], [3, 4]], [[2, 2], [2]]]
        + [[ints(R.randint(0, 8), 0, 9), ints(R.randint(0, 8), 0, 9)] for _ in range(8)],
    ),
    (
        "countBits",
        "def countBits(self, n: int) -> int",
        "Return how many 1 bits the binary representation of the non-negative integer `n` has.",
        "return bin(n).count('1')",
        [237],
        [[0], [1], [2], [255], [256], [2**31 - 1]] + [[R.randint(0, 10**9)] for _ in range(6)],
    ),
]


def _reference_source(method: str, signature: str, body: str) -> str:
    import textwrap

    body = textwrap.dedent(body).strip("\n")
    return f"class Solution:\n    {signature}:\n" + textwrap.indent(body, " " * 8) + "\n"


def main() -> None:
    rows = []
    for method, signature, description, body, example, hidden in PROBLEMS:
        src = _reference_source(method, signature, body)
        ns: dict = {}
        exec(compile(src, method, "exec"), ns)
        fn = getattr(ns["Solution"](), method)

        def run(args, fn=fn):
            return fn(*json.loads(json.dumps(args)))

        seen = set()
        tests = []
        for args in hidden:
            key = json.dumps(args)
            if key in seen or args == example:
                continue
            seen.add(key)
            tests.append({"args": args, "output": run(args)})
        rows.append(
            {
                "id": method,
                "method": method,
                "signature": signature,
                "description": description,
                "example": {"args": example, "output": run(example)},
                "tests": tests,
                "reference": src,
            }
        )
    with open(OUT, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} problems to {OUT}")


if __name__ == "__main__":
    main()
